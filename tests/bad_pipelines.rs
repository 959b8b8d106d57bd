//! Every kind of bad pipeline file exits 2 with a message naming the file, line and key.

mod common;

use common::*;

/// Writes `body` as bad.yaml, runs it, and returns stderr after checking the exit code.
fn fails_with_2(body: &str) -> String {
    let ws = Ws::new();
    ws.write("bad.yaml", body);
    let out = ws.run(&["run", "bad.yaml"]);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected exit 2 for:\n{body}\ngot: {err}"
    );
    assert!(
        !ws.file("artifacts/cache").exists(),
        "a bad pipeline must not create cache entries"
    );
    err
}

const INGEST: &str = "  ingest:\n    uses: ingest_csv\n    with: {path: data/raw/product_reviews.tsv, format: tsv, text: 0, label: 1}\n";

#[test]
fn a_cycle_lists_its_stages() {
    let err = fails_with_2(
        "name: x\nstages:\n  a: {uses: command, needs: [c], with: {run: [true]}}\n  b: {uses: command, needs: [a], with: {run: [true]}}\n  c: {uses: command, needs: [b], with: {run: [true]}}\n",
    );
    assert!(
        err.contains(
            "bad.yaml:3:22: stage `a`, key `needs`: the stages form a cycle: a -> b -> c -> a"
        ),
        "{err}"
    );
}

#[test]
fn an_unknown_need_is_named() {
    let err = fails_with_2(&format!(
        "name: x\nstages:\n{INGEST}  t:\n    uses: command\n    needs: [ingest, tokenise]\n    with: {{run: [true]}}\n"
    ));
    assert!(
        err.contains("bad.yaml:8:21: stage `t`, key `needs[1]`: unknown stage `tokenise`"),
        "{err}"
    );
}

#[test]
fn an_unknown_plugin_lists_the_installed_ones() {
    let err = fails_with_2("name: x\nstages:\n  a:\n    uses: ingest_tsv\n");
    assert!(err.contains("bad.yaml:4:5: stage `a`, key `uses`: unknown plugin `ingest_tsv`; installed: command, evaluate, fingerprint, ingest_csv, tokenize, train"), "{err}");
}

#[test]
fn unknown_keys_are_refused_at_every_level() {
    let err = fails_with_2(&format!("name: x\nparms: {{}}\nstages:\n{INGEST}"));
    assert!(
        err.contains("bad.yaml:2:1: key `parms`: unknown key"),
        "{err}"
    );
    let err = fails_with_2(
        "name: x\nstages:\n  a:\n    uses: command\n    need: []\n    with: {run: [true]}\n",
    );
    assert!(
        err.contains("bad.yaml:5:5: stage `a`, key `need`: unknown key"),
        "{err}"
    );
    let err = fails_with_2(
        "name: x\nstages:\n  ingest:\n    uses: ingest_csv\n    with:\n      path: data/raw/product_reviews.tsv\n      text: 0\n      label: 1\n      split: {validation: 0.1, tset: 0.2}\n",
    );
    assert!(err.contains("bad.yaml:9:32: stage `ingest`, key `with.split.tset`: unknown field `tset`, expected one of"), "{err}");
}

#[test]
fn a_wrong_type_names_the_key() {
    let err = fails_with_2(
        "name: x\nstages:\n  ingest:\n    uses: ingest_csv\n    with:\n      path: data/raw/product_reviews.tsv\n      text: 0\n      label: 1\n      split:\n        test: twenty\n",
    );
    assert!(err.contains("bad.yaml:10:9: stage `ingest`, key `with.split.test`: invalid type: string \"twenty\", expected f64"), "{err}");
    let err = fails_with_2(
        "name: x\nstages:\n  ingest:\n    uses: ingest_csv\n    with: {path: a.tsv, text: [0], label: 1}\n",
    );
    assert!(
        err.contains("key `with.text`: a column name (string) or a 0-based column index"),
        "{err}"
    );
    let err = fails_with_2("name: x\nstages:\n  a:\n    uses: command\n    with: [run]\n");
    assert!(
        err.contains("bad.yaml:5:11: stage `a`, key `with`: expected a mapping, found a list"),
        "{err}"
    );
}

#[test]
fn a_bad_interpolation_names_the_reference() {
    let err = fails_with_2(
        "name: x\nparams: {seed: 1}\nstages:\n  a:\n    uses: command\n    with:\n      run: [echo, \"${params.sed}\"]\n",
    );
    assert!(
        err.contains(
            "bad.yaml:7:19: stage `a`, key `with.run[1]`: `${params.sed}`: no param `sed`"
        ),
        "{err}"
    );
    let err = fails_with_2(
        "name: x\nstages:\n  a:\n    uses: command\n    with:\n      run: [echo, \"${env.FINETUNE_TEST_UNSET_VAR}\"]\n",
    );
    assert!(
        err.contains("environment variable `FINETUNE_TEST_UNSET_VAR` is not set"),
        "{err}"
    );
}

#[test]
fn invalid_values_and_syntax_are_located() {
    let err = fails_with_2(
        "name: x\nstages:\n  ingest:\n    uses: ingest_csv\n    with: {path: a.tsv, text: 0, label: 1, split: {validation: 0.5, test: 0.5}}\n",
    );
    assert!(err.contains("bad.yaml:5:44: stage `ingest`, key `with.split`: validation (0.5) + test (0.5) leave no rows"), "{err}");
    let err = fails_with_2("name: x\nstages:\n  a: {uses: command\n");
    assert!(err.starts_with("error: bad.yaml:"), "{err}");
    let err = fails_with_2(
        "name: x\nstages:\n  a:\n    uses: command\n    with:\n      run: [true]\n      outs: [../../outside.txt]\n",
    );
    assert!(err.contains("key `with.outs[0]`: outputs must stay inside the stage's output directory: `../../outside.txt` escapes"), "{err}");
}

#[test]
fn a_yaml_alias_bomb_is_refused_quickly() {
    let mut bomb =
        String::from("name: x\nlol:\n  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for (prev, name) in ["a", "b", "c", "d", "e", "f", "g", "h"]
        .iter()
        .zip(["b", "c", "d", "e", "f", "g", "h", "i"])
    {
        let refs = vec![format!("*{prev}"); 9].join(", ");
        bomb.push_str(&format!("  {name}: &{name} [{refs}]\n"));
    }
    bomb.push_str("stages: {}\n");
    let started = std::time::Instant::now();
    let err = fails_with_2(&bomb);
    assert!(err.contains("alias bomb"), "{err}");
    assert!(started.elapsed().as_secs() < 10);
}

#[test]
fn usage_errors_exit_2() {
    let ws = Ws::new();
    let out = ws.run(&["run", "--jobs", "many"]);
    assert_eq!(out.status.code(), Some(2));
    let out = ws.run(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    let out = ws.run(&["run", "missing.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("missing.yaml:0:0: cannot read the pipeline file"),
        "{}",
        stderr(&out)
    );
}

/// The node budget counted each alias as one value, but an alias copies its anchored text:
/// a 1 MB string anchored once and aliased 5,000 times grew to 5 GB. The text is budgeted too.
#[test]
fn an_alias_bomb_by_bytes_is_refused() {
    let mut bomb = format!(
        "name: x\nparams:\n  s: &s \"{}\"\n  l: [",
        "x".repeat(1 << 20)
    );
    bomb.push_str(&vec!["*s"; 5000].join(", "));
    bomb.push_str("]\nstages: {}\n");
    let err = fails_with_2(&bomb);
    assert!(
        err.contains("bad.yaml:4:") && err.contains("more than 16 MiB of text (an alias bomb?)"),
        "{err}"
    );
}

/// YAML merge keys (`<<: *base`), as CI files share settings: the mapping's own keys win,
/// whichever side of the merge they stand; an earlier merged mapping wins over a later one.
#[test]
fn merge_keys_share_settings() {
    let ws = Ws::new();
    let keys = |yaml: &str| -> Vec<serde_json::Value> {
        ws.write("p.yaml", yaml);
        let out = ws.run(&["status", "p.yaml", "--json"]);
        assert!(out.status.success(), "{yaml}\n{}", stderr(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        report
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["key"].clone())
            .collect()
    };
    let plain = keys(
        "name: p\nstages:\n  ingest:\n    uses: ingest_csv\n    with: {path: data/raw/product_reviews.tsv, format: tsv, text: 0, label: 1}\n",
    );
    let merged = keys(
        "name: p\nparams:\n  base: &base {path: data/raw/product_reviews.tsv, format: csv, text: 0}\n  \
         more: &more {label: 1, format: json}\nstages:\n  ingest:\n    uses: ingest_csv\n    with:\n      \
         format: tsv\n      <<: [*base, *more]\n",
    );
    assert_eq!(merged, plain);
    let after = keys(
        "name: p\nparams:\n  base: &base {path: data/raw/product_reviews.tsv, format: csv, text: 0, label: 1}\n\
         stages:\n  ingest:\n    uses: ingest_csv\n    with:\n      <<: *base\n      format: tsv\n",
    );
    assert_eq!(after, plain);
    let err = fails_with_2("name: x\nstages:\n  a:\n    <<: [1, 2]\n");
    assert!(
        err.contains("`<<` takes a mapping or a list of mappings"),
        "{err}"
    );
}

/// `${env.X}` as a whole value reads as a YAML scalar, as `${params.X}` keeps its type:
/// `seed: "${env.SEED}"` with SEED=7 is the integer 7 (it was the string "7", a type error).
#[test]
fn a_whole_env_reference_keeps_the_type_of_its_text() {
    let ws = Ws::new();
    let yaml = |seed: &str| {
        format!(
            "name: p\nstages:\n  ingest:\n    uses: ingest_csv\n    with: {{path: data/raw/product_reviews.tsv, \
             format: tsv, text: 0, label: 1, split: {{validation: 0.1, test: 0.2, seed: {seed}}}}}\n"
        )
    };
    let key = |yaml: String| {
        ws.write("p.yaml", yaml);
        let out = ws
            .command(&["status", "p.yaml", "--json"])
            .env("SEED", "7")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        report[0]["key"].clone()
    };
    assert_eq!(key(yaml("\"${env.SEED}\"")), key(yaml("7")));
}
