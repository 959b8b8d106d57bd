//! The audit behind `finetune audit`: evidence that AWP and Mixout are this crate's own code.
//!
//! For each implementation it parses the source compiled into this binary (`syn`) and checks
//! that every path it names is std, burn's tensor/module API, burn's gradient container or this
//! crate (an allow-list); that the functions carrying the algorithm exist and contain its
//! arithmetic; and that no package in Cargo.lock is named for AWP or Mixout. It prints a
//! SHA-256 of each function's normalised syntax tree (comments and doc text removed), so any
//! change to an algorithm shows in review as a changed fingerprint.

use std::collections::{BTreeMap, BTreeSet};

use quote::ToTokens;
use sha2::{Digest, Sha256};
use syn::visit::Visit;
use syn::visit_mut::VisitMut;

/// One implementation under audit.
pub struct Implementation {
    pub algorithm: &'static str,
    pub file: &'static str,
    pub source: &'static str,
    pub carriers: &'static [Carrier],
}

/// A function that must exist and hold some of the algorithm's arithmetic.
pub struct Carrier {
    /// `function` or `Type::method`.
    pub function: &'static str,
    pub what: &'static str,
    /// Method or function names its body must call.
    pub calls: &'static [&'static str],
    /// Binary operators (`+ - * /`) its body must use.
    pub operators: &'static [&'static str],
}

/// The two implementations, as compiled into this binary.
pub const IMPLEMENTATIONS: &[Implementation] = &[
    Implementation {
        algorithm: "AWP",
        file: "crates/regularizers/src/awp.rs",
        source: include_str!("awp.rs"),
        carriers: &[
            Carrier {
                function: "Perturb::map_float",
                what: "w + adv_lr·g/‖g‖·‖w‖, clamped to w₀ ± adv_eps·|w₀|",
                calls: &[
                    "l2_norm",
                    "mul_scalar",
                    "abs",
                    "max_pair",
                    "min_pair",
                    "require_grad",
                ],
                operators: &["*", "/", "+", "-"],
            },
            Carrier {
                function: "l2_norm",
                what: "per-tensor L2 norm",
                calls: &["powi_scalar", "sum", "sqrt"],
                operators: &[],
            },
            Carrier {
                function: "Attack::run",
                what: "perturb, then the gradient at the perturbed weights, `steps` times",
                calls: &["perturb", "gradients", "clone"],
                operators: &[],
            },
        ],
    },
    Implementation {
        algorithm: "Mixout",
        file: "crates/regularizers/src/mixout.rs",
        source: include_str!("mixout.rs"),
        carriers: &[
            Carrier {
                function: "combine",
                what: "(m·w + (1 − p − m)·u) / (1 − p)",
                calls: &["neg", "add_scalar", "div_scalar"],
                operators: &["*", "+", "-"],
            },
            Carrier {
                function: "draw_mask",
                what: "m ~ Bernoulli(1 − p), per element",
                calls: &["random_like", "Bernoulli"],
                operators: &["-"],
            },
            Carrier {
                function: "Mixout::mix",
                what: "mixing only while training, identity at evaluation",
                calls: &["is_autodiff", "draw_mask", "combine"],
                operators: &[],
            },
        ],
    },
];

/// Path prefixes an implementation may name (after resolving its `use` items).
const ALLOWED: &[&str] = &[
    "std::",
    "core::",
    "burn::tensor::",
    "burn::module::",
    "burn::optim::GradientsParams",
    "crate::",
    "super::",
];

/// Names usable without a `use`: the prelude and the language.
const PRELUDE: &[&str] = &[
    "Self", "self", "Some", "None", "Ok", "Err", "Option", "Result", "Vec", "String", "Box",
    "Default", "Clone", "Debug", "f32", "f64", "usize", "u64", "i64", "bool", "str",
];

/// Macros an implementation may use (all from std).
const MACROS: &[&str] = &[
    "assert",
    "assert_eq",
    "debug_assert",
    "debug_assert_eq",
    "format",
    "panic",
    "vec",
    "write",
    "matches",
];

/// Words a package providing either algorithm would be named with (whole words of the name:
/// `rawpointer` is not `awp`).
const FORBIDDEN_WORDS: &[&str] = &["awp", "mixout", "mixlinear"];
/// Phrases, anywhere in the name.
const FORBIDDEN_PHRASES: &[&str] = &["adversarial-weight", "weight-perturbation"];

/// The result of auditing one implementation.
#[derive(Debug)]
pub struct Finding {
    pub algorithm: &'static str,
    pub file: &'static str,
    /// Distinct external paths it names, resolved.
    pub paths: BTreeSet<String>,
    /// Each carrier with the fingerprint of its syntax tree.
    pub carriers: Vec<(String, &'static str, String)>,
    /// Fingerprint of the whole file.
    pub fingerprint: String,
    pub violations: Vec<String>,
}

/// Audits `implementation`.
pub fn audit(implementation: &Implementation) -> Finding {
    let mut finding = Finding {
        algorithm: implementation.algorithm,
        file: implementation.file,
        paths: BTreeSet::new(),
        carriers: Vec::new(),
        fingerprint: String::new(),
        violations: Vec::new(),
    };
    let mut file = match syn::parse_file(implementation.source) {
        Ok(file) => file,
        Err(e) => {
            finding.violations.push(format!("does not parse: {e}"));
            return finding;
        }
    };
    StripDocs.visit_file_mut(&mut file);
    finding.fingerprint = fingerprint(&file);

    let imports = imports(&file);
    let local = local_names(&file);
    let mut names = Names::default();
    names.visit_file(&file);
    for path in imports.values() {
        check_path(path, &mut finding);
    }
    for path in &names.paths {
        let first = path.split("::").next().unwrap_or_default();
        if let Some(full) = imports.get(first) {
            let rest = &path[first.len()..];
            finding.paths.insert(format!("{full}{rest}"));
        } else if local.contains(first) || PRELUDE.contains(&first) || !path.contains("::") {
            continue; // a local item, a prelude name, or a variable
        } else {
            check_path(path, &mut finding);
        }
    }
    for name in &names.macros {
        if !MACROS.contains(&name.as_str()) {
            finding.violations.push(format!(
                "uses the macro `{name}!`, which is not on the allow-list"
            ));
        }
    }

    let functions = functions(&file);
    for carrier in implementation.carriers {
        let Some(function) = functions.get(carrier.function) else {
            finding.violations.push(format!(
                "has no function `{}` ({})",
                carrier.function, carrier.what
            ));
            continue;
        };
        let mut body = Names::default();
        body.visit_block(&function.block);
        for call in carrier.calls {
            if !body.calls.contains(*call) {
                finding.violations.push(format!(
                    "`{}` does not call `{call}`: it must compute {}",
                    carrier.function, carrier.what
                ));
            }
        }
        for operator in carrier.operators {
            if !body.operators.contains(*operator) {
                finding.violations.push(format!(
                    "`{}` has no `{operator}`: it must compute {}",
                    carrier.function, carrier.what
                ));
            }
        }
        finding.carriers.push((
            carrier.function.to_string(),
            carrier.what,
            fingerprint(function),
        ));
    }
    finding
}

/// Package names in `lock` (a Cargo.lock) that suggest AWP or Mixout.
pub fn suspicious_packages(lock: &str) -> (usize, Vec<String>) {
    let names: Vec<&str> = lock
        .lines()
        .filter_map(|line| line.strip_prefix("name = \""))
        .filter_map(|rest| rest.strip_suffix('"'))
        .collect();
    let suspicious = names
        .iter()
        .filter(|name| {
            let lower = name.to_ascii_lowercase().replace('_', "-");
            lower.split('-').any(|word| FORBIDDEN_WORDS.contains(&word))
                || FORBIDDEN_PHRASES
                    .iter()
                    .any(|phrase| lower.contains(phrase))
        })
        .map(|name| name.to_string())
        .collect();
    (names.len(), suspicious)
}

/// The Cargo.lock this binary was built with.
pub const CARGO_LOCK: &str = include_str!("../../../Cargo.lock");

/// The whole audit as text, and whether it passed.
pub fn report() -> (String, bool) {
    let mut text = String::new();
    let mut passed = true;
    for implementation in IMPLEMENTATIONS {
        let finding = audit(implementation);
        text.push_str(&format!("{} ({})\n", finding.algorithm, finding.file));
        let paths: Vec<&str> = finding.paths.iter().map(String::as_str).collect();
        text.push_str(&format!("  names only: {}\n", paths.join(", ")));
        for (function, what, print) in &finding.carriers {
            text.push_str(&format!("  {function}: {what}\n    fingerprint {print}\n"));
        }
        text.push_str(&format!("  file fingerprint {}\n", finding.fingerprint));
        for violation in &finding.violations {
            text.push_str(&format!("  VIOLATION: {violation}\n"));
            passed = false;
        }
    }
    let (count, suspicious) = suspicious_packages(CARGO_LOCK);
    if suspicious.is_empty() {
        text.push_str(&format!(
            "Cargo.lock: {count} packages, none named for AWP or Mixout\n"
        ));
    } else {
        passed = false;
        text.push_str(&format!(
            "Cargo.lock: VIOLATION: packages named for AWP or Mixout: {}\n",
            suspicious.join(", ")
        ));
    }
    (text, passed)
}

fn check_path(path: &str, finding: &mut Finding) {
    finding.paths.insert(path.to_string());
    if !ALLOWED.iter().any(|allowed| path.starts_with(allowed)) {
        finding.violations.push(format!(
            "names `{path}`, outside std, burn's tensor/module API and this crate"
        ));
    }
}

/// `sha256:` of the item's tokens, printed without comments or whitespace differences.
fn fingerprint(item: &impl ToTokens) -> String {
    let tokens = item.to_token_stream().to_string();
    format!("sha256:{}", hex::encode(Sha256::digest(tokens.as_bytes())))
}

/// Removes `///` and `//!` text (doc attributes): rewording a comment is not a change.
struct StripDocs;

impl VisitMut for StripDocs {
    fn visit_attributes_mut(&mut self, attributes: &mut Vec<syn::Attribute>) {
        attributes.retain(|a| !a.path().is_ident("doc"));
    }
}

/// Imported name → full path, from every `use` item (`use a::{b, c::d as e}`).
fn imports(file: &syn::File) -> BTreeMap<String, String> {
    fn walk(tree: &syn::UseTree, prefix: &str, out: &mut BTreeMap<String, String>) {
        match tree {
            syn::UseTree::Path(p) => walk(&p.tree, &format!("{prefix}{}::", p.ident), out),
            syn::UseTree::Name(n) => {
                let name = n.ident.to_string();
                let full = if name == "self" {
                    prefix.trim_end_matches("::").to_string()
                } else {
                    format!("{prefix}{name}")
                };
                let short = full.rsplit("::").next().unwrap_or_default().to_string();
                out.insert(short, full);
            }
            syn::UseTree::Rename(r) => {
                out.insert(r.rename.to_string(), format!("{prefix}{}", r.ident));
            }
            syn::UseTree::Glob(_) => {
                out.insert(format!("{prefix}*"), format!("{prefix}*"));
            }
            syn::UseTree::Group(g) => g.items.iter().for_each(|t| walk(t, prefix, out)),
        }
    }
    let mut out = BTreeMap::new();
    for item in &file.items {
        if let syn::Item::Use(u) = item {
            walk(&u.tree, "", &mut out);
        }
    }
    out
}

/// Items the file defines (types, functions, consts), and generic parameters.
fn local_names(file: &syn::File) -> BTreeSet<String> {
    #[derive(Default)]
    struct Local(BTreeSet<String>);
    impl<'a> Visit<'a> for Local {
        fn visit_item(&mut self, item: &'a syn::Item) {
            let ident = match item {
                syn::Item::Struct(s) => Some(&s.ident),
                syn::Item::Enum(e) => Some(&e.ident),
                syn::Item::Fn(f) => Some(&f.sig.ident),
                syn::Item::Const(c) => Some(&c.ident),
                syn::Item::Type(t) => Some(&t.ident),
                _ => None,
            };
            if let Some(ident) = ident {
                self.0.insert(ident.to_string());
            }
            syn::visit::visit_item(self, item);
        }
        fn visit_generic_param(&mut self, param: &'a syn::GenericParam) {
            match param {
                syn::GenericParam::Type(t) => self.0.insert(t.ident.to_string()),
                syn::GenericParam::Const(c) => self.0.insert(c.ident.to_string()),
                syn::GenericParam::Lifetime(_) => false,
            };
            syn::visit::visit_generic_param(self, param);
        }
    }
    let mut local = Local::default();
    local.visit_file(file);
    local.0
}

/// Free functions by name and methods as `Type::method`.
fn functions(file: &syn::File) -> BTreeMap<String, syn::ItemFn> {
    let mut out = BTreeMap::new();
    for item in &file.items {
        match item {
            syn::Item::Fn(f) => {
                out.insert(f.sig.ident.to_string(), f.clone());
            }
            syn::Item::Impl(i) => {
                let syn::Type::Path(self_type) = i.self_ty.as_ref() else {
                    continue;
                };
                let Some(type_name) = self_type.path.segments.last() else {
                    continue;
                };
                for inner in &i.items {
                    if let syn::ImplItem::Fn(m) = inner {
                        out.insert(
                            format!("{}::{}", type_name.ident, m.sig.ident),
                            syn::ItemFn {
                                attrs: m.attrs.clone(),
                                vis: m.vis.clone(),
                                sig: m.sig.clone(),
                                block: Box::new(m.block.clone()),
                            },
                        );
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// Paths (`a::b::c`), called names, macros and operators in a syntax tree.
#[derive(Default)]
struct Names {
    paths: BTreeSet<String>,
    calls: BTreeSet<String>,
    macros: BTreeSet<String>,
    operators: BTreeSet<String>,
}

impl<'a> Visit<'a> for Names {
    fn visit_path(&mut self, path: &'a syn::Path) {
        let text: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        if let Some(last) = text.last() {
            self.calls.insert(last.clone());
        }
        self.paths.insert(text.join("::"));
        syn::visit::visit_path(self, path);
    }
    fn visit_expr_method_call(&mut self, call: &'a syn::ExprMethodCall) {
        self.calls.insert(call.method.to_string());
        syn::visit::visit_expr_method_call(self, call);
    }
    fn visit_macro(&mut self, mac: &'a syn::Macro) {
        let name = mac.path.segments.last().map(|s| s.ident.to_string());
        self.macros.insert(name.unwrap_or_default());
        syn::visit::visit_macro(self, mac);
    }
    fn visit_bin_op(&mut self, op: &'a syn::BinOp) {
        let text = op.to_token_stream().to_string();
        self.operators
            .insert(text.trim_end_matches('=').to_string());
        syn::visit::visit_bin_op(self, op);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_implementations_pass() {
        for implementation in IMPLEMENTATIONS {
            let finding = audit(implementation);
            assert!(finding.violations.is_empty(), "{finding:#?}");
            assert_eq!(finding.carriers.len(), implementation.carriers.len());
        }
        let (count, suspicious) = suspicious_packages(CARGO_LOCK);
        assert!(count > 100, "{count} packages: not the real Cargo.lock");
        assert!(suspicious.is_empty(), "{suspicious:?}");
    }

    fn audited(source: &'static str) -> Finding {
        audit(&Implementation {
            source,
            ..IMPLEMENTATIONS[1]
        })
    }

    #[test]
    fn a_borrowed_implementation_is_caught() {
        let source = Box::leak(
            IMPLEMENTATIONS[1]
                .source
                .replace("use burn::tensor::{Distribution, Tensor};", "use burn::tensor::{Distribution, Tensor};\nuse mixout_crate::mix as their_mix;")
                .into_boxed_str(),
        );
        let finding = audited(source);
        assert!(
            finding
                .violations
                .iter()
                .any(|v| v.contains("names `mixout_crate::mix`")),
            "{finding:#?}"
        );
        let fully_qualified: &'static str = Box::leak(
            IMPLEMENTATIONS[1]
                .source
                .replace("let keep = 1.0 - p;", "let keep = other::keep(p);")
                .into_boxed_str(),
        );
        assert!(
            audited(fully_qualified)
                .violations
                .iter()
                .any(|v| v.contains("names `other::keep`"))
        );
    }

    #[test]
    fn an_algorithm_without_its_arithmetic_is_caught() {
        let gutted: &'static str = Box::leak(
            IMPLEMENTATIONS[1]
                .source
                .replace(
                    "(weight * mask + target * target_share).div_scalar(keep)",
                    "weight",
                )
                .into_boxed_str(),
        );
        let violations = audited(gutted).violations;
        assert!(
            violations
                .iter()
                .any(|v| v.contains("`combine` does not call `div_scalar`")),
            "{violations:?}"
        );
        let renamed: &'static str = Box::leak(
            IMPLEMENTATIONS[1]
                .source
                .replace("pub fn combine(weight", "pub fn blend(weight")
                .into_boxed_str(),
        );
        assert!(
            audited(renamed)
                .violations
                .iter()
                .any(|v| v.contains("has no function `combine`"))
        );
    }

    #[test]
    fn fingerprints_ignore_comments_and_see_code_changes() {
        let original = audit(&IMPLEMENTATIONS[1]);
        let commented: &'static str = Box::leak(
            IMPLEMENTATIONS[1]
                .source
                .replace(
                    "/// `((1 − m)",
                    "// an extra comment\n/// reworded: `((1 − m)",
                )
                .into_boxed_str(),
        );
        assert_eq!(audited(commented).fingerprint, original.fingerprint);
        let changed: &'static str = Box::leak(
            IMPLEMENTATIONS[1]
                .source
                .replace("let keep = 1.0 - p;", "let keep = 1.0 - p * 1.0;")
                .into_boxed_str(),
        );
        let changed = audited(changed);
        assert_ne!(changed.fingerprint, original.fingerprint);
        let print = |f: &Finding| {
            f.carriers
                .iter()
                .find(|c| c.0 == "combine")
                .unwrap()
                .2
                .clone()
        };
        assert_ne!(print(&changed), print(&original));
    }

    #[test]
    fn a_package_named_for_an_algorithm_is_caught() {
        let lock = "[[package]]\nname = \"rawpointer\"\n\n[[package]]\nname = \"torch_mixout\"\n\n[[package]]\nname = \"awp\"\n";
        assert_eq!(
            suspicious_packages(lock),
            (3, vec!["torch_mixout".to_string(), "awp".to_string()])
        );
    }
}
