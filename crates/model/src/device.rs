//! Which device a `device:` name means, and opening it.
//!
//! Names: `cpu` (or `flex`): burn's flex backend with the fused kernels; `cpu-generic`: the
//! same device through burn's own operations, the path every GPU takes (a reference for the
//! GPU path that any machine can run); `cuda[:N]`, `vulkan[:N]`, `wgpu[:N]`: burn's CubeCL
//! backends, in a build with the feature of that name; `auto`: the first GPU this build can
//! open (CUDA, then Vulkan), else the CPU.
//!
//! [`DeviceSpec::parse`] checks a name without touching any hardware (a pipeline is checked
//! before anything runs); [`DeviceSpec::open`] makes the device, and fails with the reason
//! when the backend cannot start (no driver, no such card).

use std::fmt;

use burn::tensor::Device;

use crate::ModelError;

/// A device name, checked: what [`DeviceSpec::open`] will make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The flex backend with the fused kernels.
    Cpu,
    /// The flex backend through burn's own operations (the GPU path).
    CpuGeneric,
    Cuda(usize),
    /// A Vulkan adapter: the Nth discrete GPU, or wgpu's default pick.
    Vulkan(Option<usize>),
    /// wgpu on whichever graphics API the machine offers.
    Wgpu(Option<usize>),
    /// The first GPU that opens, else the CPU.
    Auto,
}

/// The names [`DeviceSpec::parse`] knows, for error messages.
const KNOWN: &str = "cpu, cpu-generic, cuda[:N], vulkan[:N], wgpu[:N], auto";

impl DeviceSpec {
    /// The device `name` means, if this build has its backend.
    pub fn parse(name: &str) -> Result<DeviceSpec, ModelError> {
        let (backend, index) = match name.split_once(':') {
            Some((backend, index)) => (backend, Some(parse_index(name, index)?)),
            None => (name, None),
        };
        let spec = match (backend, index) {
            ("cpu" | "flex", None) => DeviceSpec::Cpu,
            ("cpu-generic", None) => DeviceSpec::CpuGeneric,
            ("auto", None) => DeviceSpec::Auto,
            ("cuda", index) => DeviceSpec::Cuda(index.unwrap_or(0)),
            ("vulkan", index) => DeviceSpec::Vulkan(index),
            ("wgpu", index) => DeviceSpec::Wgpu(index),
            _ => {
                return Err(ModelError::Device(format!(
                    "unknown device `{name}` (known: {KNOWN})"
                )));
            }
        };
        match spec.missing_feature() {
            Some(feature) => Err(ModelError::Device(format!(
                "device `{name}` needs a build with the `{feature}` feature \
                 (cargo build --release --features {feature}); this build has: {}",
                built_in().join(", ")
            ))),
            None => Ok(spec),
        }
    }

    /// The cargo feature this device needs and this build lacks.
    fn missing_feature(&self) -> Option<&'static str> {
        match self {
            DeviceSpec::Cuda(_) if !cfg!(feature = "cuda") => Some("cuda"),
            DeviceSpec::Vulkan(_) if !cfg!(feature = "vulkan") => Some("vulkan"),
            DeviceSpec::Wgpu(_) if !cfg!(feature = "wgpu") => Some("wgpu"),
            _ => None,
        }
    }

    /// The device this name stands for: `auto`'s pick (probed once a process: opening a GPU
    /// backend takes seconds), any other name itself.
    pub fn resolved(&self) -> DeviceSpec {
        static AUTO: std::sync::OnceLock<DeviceSpec> = std::sync::OnceLock::new();
        match self {
            DeviceSpec::Auto => AUTO
                .get_or_init(|| gpu::first_that_opens().unwrap_or(DeviceSpec::Cpu))
                .clone(),
            other => other.clone(),
        }
    }

    /// Makes the device and checks that it answers.
    pub fn open(&self) -> Result<ComputeDevice, ModelError> {
        match self {
            DeviceSpec::Cpu => Ok(ComputeDevice::cpu(false)),
            DeviceSpec::CpuGeneric => Ok(ComputeDevice::cpu(true)),
            DeviceSpec::Auto => {
                let mut device = self.resolved().open()?;
                device.report.note = Some(match device.is_gpu() {
                    true => "picked by `device: auto`".into(),
                    false => "`device: auto` found no GPU this build can open".into(),
                });
                Ok(device)
            }
            gpu => gpu::open(gpu),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let indexed = |f: &mut fmt::Formatter<'_>, backend: &str, index: &Option<usize>| match index
        {
            Some(i) => write!(f, "{backend}:{i}"),
            None => write!(f, "{backend}"),
        };
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::CpuGeneric => write!(f, "cpu-generic"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
            DeviceSpec::Vulkan(index) => indexed(f, "vulkan", index),
            DeviceSpec::Wgpu(index) => indexed(f, "wgpu", index),
            DeviceSpec::Auto => write!(f, "auto"),
        }
    }
}

fn parse_index(name: &str, index: &str) -> Result<usize, ModelError> {
    index.parse().map_err(|_| {
        ModelError::Device(format!(
            "device `{name}`: `{index}` is not a device index (0, 1, ...)"
        ))
    })
}

/// The backends this build has, as device names.
pub fn built_in() -> Vec<&'static str> {
    let mut names = vec!["cpu", "cpu-generic", "auto"];
    if cfg!(feature = "cuda") {
        names.push("cuda");
    }
    if cfg!(feature = "vulkan") {
        names.push("vulkan");
    }
    if cfg!(feature = "wgpu") {
        names.push("wgpu");
    }
    names
}

/// An opened device, with the choice of kernels it runs.
#[derive(Clone, Debug)]
pub struct ComputeDevice {
    device: Device,
    /// Whether the flex device takes burn's own operations instead of the fused kernels
    /// (GPUs always do).
    generic_ops: bool,
    report: DeviceReport,
}

/// What a run records of its device (run_history.json's `device`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeviceReport {
    /// As a device name: `cpu`, `cpu-generic`, `cuda:0`.
    pub name: String,
    /// The card as it names itself (`NVIDIA H200`); none for the CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    /// What the backend compiles kernels for (`ptx_sm90`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compiles_for: Option<String>,
    /// The float type, where it is not f32 ([`ComputeDevice::use_bf16`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision: Option<String>,
    /// The NVIDIA kernel driver's version line, where there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// Something the user should hear about the choice (`auto`'s fallback).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl ComputeDevice {
    fn cpu(generic_ops: bool) -> Self {
        finetune_kernels::keep_freed_tensor_buffers();
        ComputeDevice {
            device: Device::flex(),
            generic_ops,
            report: DeviceReport {
                name: if generic_ops { "cpu-generic" } else { "cpu" }.into(),
                adapter: None,
                compiles_for: None,
                precision: None,
                driver: None,
                note: None,
            },
        }
    }

    /// The burn device, without autodiff.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The device's name: `cpu`, `cpu-generic`, `cuda:0`, `vulkan:0`.
    pub fn name(&self) -> &str {
        &self.report.name
    }

    /// Whether this is a GPU (the CPU runs the same work in other ways: see [`Self::run`]).
    pub fn is_gpu(&self) -> bool {
        !self.report.name.starts_with("cpu")
    }

    /// What a run records of the device.
    pub fn report(&self) -> &DeviceReport {
        &self.report
    }

    /// A line for the log: `cuda:0 (NVIDIA H200, ptx_sm90, driver ...)`.
    pub fn describe(&self) -> String {
        let r = &self.report;
        let driver = r.driver.as_ref().map(|d| format!("driver {d}"));
        let details: Vec<&str> = [&r.adapter, &r.compiles_for, &r.precision, &driver]
            .into_iter()
            .filter_map(|detail| detail.as_deref())
            .collect();
        let mut line = r.name.clone();
        if !details.is_empty() {
            line.push_str(&format!(" ({})", details.join(", ")));
        }
        if let Some(note) = &r.note {
            line.push_str(&format!("; {note}"));
        }
        line
    }

    /// Runs `work` with the model's operations on this device's path (fused kernels or burn's
    /// own operations). The choice is the calling thread's, so the work runs here.
    pub fn run<R>(&self, work: impl FnOnce() -> R) -> R {
        finetune_kernels::with_generic_ops(self.generic_ops, work)
    }

    /// Makes every float tensor this device creates from now on bfloat16: weights, activations
    /// and outputs (burn has no autocast, so this is the whole computation's precision, and
    /// sound only where nothing trains: prediction and evaluation). The fused CPU kernels are
    /// f32-only, so the device then takes burn's own operations. Must come before the device
    /// makes its first tensor: burn fixes a device's float type once.
    pub fn use_bf16(&mut self) -> Result<(), ModelError> {
        use burn::tensor::FloatDType;
        let name = &self.report.name;
        if !self.device.supports_dtype(FloatDType::BF16) {
            return Err(ModelError::Device(format!(
                "device `{name}` has no bf16 arithmetic; use f32"
            )));
        }
        self.device.configure(FloatDType::BF16).map_err(|e| {
            ModelError::Device(format!("device `{name}`: cannot switch to bf16: {e}"))
        })?;
        self.generic_ops = true;
        self.report.precision = Some("bf16".into());
        Ok(())
    }

    /// Hands cached allocations back to the device (after running out of memory).
    pub fn release_cached_memory(&self) {
        self.device.memory_cleanup();
    }
}

/// Opening GPU devices: each backend only in a build with its feature.
mod gpu {
    use super::{ComputeDevice, DeviceSpec};
    use crate::ModelError;

    /// The first GPU device that opens, CUDA first: what `auto` picks.
    pub(super) fn first_that_opens() -> Option<DeviceSpec> {
        let candidates = [
            cfg!(feature = "cuda").then_some(DeviceSpec::Cuda(0)),
            cfg!(feature = "vulkan").then_some(DeviceSpec::Vulkan(Some(0))),
        ];
        candidates
            .into_iter()
            .flatten()
            .find(|spec| open(spec).is_ok())
    }

    #[cfg(any(feature = "cuda", feature = "vulkan", feature = "wgpu"))]
    pub(super) fn open(spec: &DeviceSpec) -> Result<ComputeDevice, ModelError> {
        use burn::tensor::Device;
        let device = match spec {
            #[cfg(feature = "cuda")]
            DeviceSpec::Cuda(index) => Device::cuda(*index),
            #[cfg(feature = "vulkan")]
            DeviceSpec::Vulkan(index) => Device::vulkan(adapter(*index)),
            #[cfg(feature = "wgpu")]
            DeviceSpec::Wgpu(index) => Device::wgpu(adapter(*index)),
            other => unreachable!("{other} is not a GPU backend of this build"),
        };
        // The backends start lazily and report a missing driver or card by panicking.
        let identity = quietly(|| device.identity()).map_err(|reason| {
            ModelError::Device(format!("device `{spec}` could not be opened: {reason}"))
        })?;
        Ok(ComputeDevice {
            device,
            generic_ops: true,
            report: super::DeviceReport {
                name: spec.to_string(),
                adapter: identity.as_ref().map(|id| id.name.clone()),
                compiles_for: identity.map(|id| id.fingerprint),
                precision: None,
                driver: nvidia_driver(),
                note: None,
            },
        })
    }

    /// The NVIDIA kernel module's version (`/proc/driver/nvidia/version`'s first line names it
    /// after `Kernel Module`), where the machine has one.
    #[cfg(any(feature = "cuda", feature = "vulkan", feature = "wgpu"))]
    fn nvidia_driver() -> Option<String> {
        let text = std::fs::read_to_string("/proc/driver/nvidia/version").ok()?;
        let line = text.lines().next()?;
        let version = line
            .split("Kernel Module")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or(line.trim());
        Some(version.to_string())
    }

    /// wgpu's adapter: the Nth discrete GPU, or its own pick.
    #[cfg(any(feature = "vulkan", feature = "wgpu"))]
    fn adapter(index: Option<usize>) -> burn::tensor::DeviceKind {
        use burn::tensor::DeviceKind;
        index.map_or(DeviceKind::DefaultDevice, DeviceKind::DiscreteGpu)
    }

    #[cfg(not(any(feature = "cuda", feature = "vulkan", feature = "wgpu")))]
    pub(super) fn open(spec: &DeviceSpec) -> Result<ComputeDevice, ModelError> {
        // `parse` refuses every GPU name in a build without GPU backends.
        Err(ModelError::Device(format!(
            "device `{spec}` is not built in"
        )))
    }

    /// Runs `probe`, turning a panic into its message without printing it: the panic is an
    /// answer here (no driver), not a crash. The backends open the device on a thread of their
    /// own, so the probe's own panic is often only "the channel closed"; the first panic seen
    /// while it runs (any thread's) names the cause, e.g. the driver library that is missing.
    /// The hook is the process's, so a panic elsewhere in this moment is not printed either;
    /// that thread still unwinds as it would.
    #[cfg(any(feature = "cuda", feature = "vulkan", feature = "wgpu"))]
    fn quietly<R>(probe: impl FnOnce() -> R) -> Result<R, String> {
        use std::sync::{Arc, Mutex};
        let first_panic: Arc<Mutex<Option<String>>> = Arc::default();
        let hook = std::panic::take_hook();
        let seen = Arc::clone(&first_panic);
        std::panic::set_hook(Box::new(move |info| {
            let mut first = seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            first.get_or_insert_with(|| panic_message(info.payload()));
        }));
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(probe));
        std::panic::set_hook(hook);
        result.map_err(|payload| {
            let first = first_panic
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            first
                .clone()
                .unwrap_or_else(|| panic_message(payload.as_ref()))
        })
    }

    #[cfg(any(feature = "cuda", feature = "vulkan", feature = "wgpu"))]
    fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the backend panicked".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(name: &str) -> String {
        DeviceSpec::parse(name).unwrap_err().to_string()
    }

    #[test]
    fn names_parse_to_their_devices_and_print_back() {
        assert_eq!(DeviceSpec::parse("cpu").unwrap(), DeviceSpec::Cpu);
        assert_eq!(DeviceSpec::parse("flex").unwrap(), DeviceSpec::Cpu);
        assert_eq!(
            DeviceSpec::parse("cpu-generic").unwrap(),
            DeviceSpec::CpuGeneric
        );
        assert_eq!(DeviceSpec::parse("auto").unwrap(), DeviceSpec::Auto);
        if cfg!(feature = "cuda") {
            assert_eq!(DeviceSpec::parse("cuda").unwrap(), DeviceSpec::Cuda(0));
            assert_eq!(DeviceSpec::parse("cuda:1").unwrap().to_string(), "cuda:1");
        }
        if cfg!(feature = "vulkan") {
            assert_eq!(DeviceSpec::parse("vulkan").unwrap().to_string(), "vulkan");
            assert_eq!(
                DeviceSpec::parse("vulkan:0").unwrap(),
                DeviceSpec::Vulkan(Some(0))
            );
        }
    }

    #[test]
    fn bad_names_say_what_is_known() {
        let err = error("tpu");
        assert!(err.contains("unknown device `tpu`"), "{err}");
        assert!(err.contains("cpu, cpu-generic, cuda[:N]"), "{err}");
        let err = error("cuda:first");
        assert!(err.contains("`first` is not a device index"), "{err}");
        assert!(error("cpu:0").contains("unknown device `cpu:0`"));
    }

    #[test]
    fn a_backend_not_built_in_names_its_feature() {
        for (name, feature) in [("cuda:0", "cuda"), ("vulkan", "vulkan"), ("wgpu:1", "wgpu")] {
            let built = match feature {
                "cuda" => cfg!(feature = "cuda"),
                "vulkan" => cfg!(feature = "vulkan"),
                _ => cfg!(feature = "wgpu"),
            };
            if built {
                continue;
            }
            let err = error(name);
            assert!(
                err.contains(&format!("needs a build with the `{feature}` feature")),
                "{err}"
            );
            assert!(err.contains("--features"), "{err}");
        }
    }

    #[test]
    fn the_cpu_devices_differ_only_in_their_kernels() {
        let fused = DeviceSpec::Cpu.open().unwrap();
        let generic = DeviceSpec::CpuGeneric.open().unwrap();
        assert!(!fused.is_gpu() && !generic.is_gpu());
        let probe = Device::flex();
        assert!(fused.run(|| finetune_kernels::runs_fused(&probe)));
        assert!(!generic.run(|| finetune_kernels::runs_fused(&probe)));
        assert_eq!(generic.describe(), "cpu-generic");
    }

    #[test]
    fn auto_without_a_gpu_backend_is_the_cpu() {
        if cfg!(any(feature = "cuda", feature = "vulkan")) {
            return; // which GPU opens is the machine's; scripts/gpu-check.sh runs it there
        }
        assert_eq!(DeviceSpec::Auto.resolved(), DeviceSpec::Cpu);
        let device = DeviceSpec::Auto.open().unwrap();
        assert_eq!(device.name(), "cpu");
        assert!(
            device.describe().contains("found no GPU"),
            "{}",
            device.describe()
        );
    }
}
