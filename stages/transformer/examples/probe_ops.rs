use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{Distribution, Tensor};
use std::time::Instant;
fn time<F: FnMut()>(name: &str, mut f: F) {
    f();
    let mut v: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    v.sort_by(f64::total_cmp);
    println!("{name}: {:.2} ms", v[3]);
}
fn main() {
    let d = burn::tensor::Device::flex();
    let ad = d.clone().autodiff();
    let x = Tensor::<2>::random([1024, 1536], Distribution::Normal(0.0, 1.0), &d);
    time("gelu fwd [1024,1536]", || {
        let _ = gelu(x.clone()).into_data();
    });
    let xa = Tensor::<2>::random([1024, 1536], Distribution::Normal(0.0, 1.0), &ad).require_grad();
    time("gelu fwd+bwd", || {
        let y = gelu(xa.clone()).sum();
        let _ = y.backward();
    });
    let h = Tensor::<2>::random([1024, 384], Distribution::Normal(0.0, 1.0), &d);
    let ln = burn::nn::LayerNormConfig::new(384)
        .with_epsilon(1e-12)
        .init(&d);
    time("layernorm fwd [1024,384]", || {
        let _ = ln.forward(h.clone()).into_data();
    });
    let lna = burn::nn::LayerNormConfig::new(384)
        .with_epsilon(1e-12)
        .init(&ad);
    let ha = Tensor::<2>::random([1024, 384], Distribution::Normal(0.0, 1.0), &ad).require_grad();
    time("layernorm fwd+bwd", || {
        let y = lna.forward(ha.clone()).sum();
        let _ = y.backward();
    });
    let s = Tensor::<4>::random([16, 12, 64, 64], Distribution::Normal(0.0, 1.0), &d);
    time("softmax fwd [16,12,64,64]", || {
        let _ = softmax(s.clone(), 3).into_data();
    });
    let sa =
        Tensor::<4>::random([16, 12, 64, 64], Distribution::Normal(0.0, 1.0), &ad).require_grad();
    time("softmax fwd+bwd", || {
        let y = softmax(sa.clone(), 3).sum();
        let _ = y.backward();
    });
    let drop = burn::nn::DropoutConfig::new(0.1).init();
    time("dropout fwd [16,12,64,64] train", || {
        let _ = drop.forward(sa.clone()).into_data();
    });
    time("add [1024,384]", || {
        let _ = (h.clone() + h.clone()).into_data();
    });
    time("swap+reshape copy [16,64,12,32]", || {
        let _ = h
            .clone()
            .reshape([16, 64, 12, 32])
            .swap_dims(1, 2)
            .reshape([192 * 64, 32])
            .into_data();
    });
}
