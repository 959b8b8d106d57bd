use std::os::unix::fs::PermissionsExt;

use serde_json::json;

use super::*;

const SECRET: &str = "0123456789abcdef-a-test-key-not-secret";

/// A workspace with a key file and a directory of two files to sign.
struct Setup {
    workspace: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let workspace = tempfile::tempdir().expect("temp dir");
        let setup = Setup { workspace };
        setup.write_key("key", SECRET);
        let out = setup.out();
        std::fs::create_dir_all(out.join("logs")).expect("mkdir");
        std::fs::write(out.join("model.bin"), [1u8, 2, 3, 4]).expect("write");
        std::fs::write(out.join("logs/log.jsonl"), "{\"step\":1}\n").expect("write");
        setup
    }

    fn root(&self) -> &Path {
        self.workspace.path()
    }

    fn out(&self) -> PathBuf {
        self.root().join("out")
    }

    fn write_key(&self, name: &str, secret: &str) {
        let path = self.root().join(name);
        std::fs::write(&path, secret).expect("write key");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }

    fn key(&self, name: &str) -> SigningKey {
        load(&KeySource::File { path: name.into() }, self.root()).expect("load key")
    }

    fn sign(&self) {
        sign_dir(&self.out(), json!({"stage": "train"}), &self.key("key")).expect("sign");
    }

    /// Verifies with the key file given, as `verify --key-file key` does (a fingerprint's own
    /// `key_source` names a key file, which `verify` alone does not trust).
    fn verify(&self) -> Result<Verification, VerifyError> {
        let key = load(&KeySource::File { path: "key".into() }, self.root())?;
        verify(&self.out(), self.root(), Some(&key))
    }

    fn problems(&self) -> Vec<Problem> {
        self.verify().expect("verifiable").problems
    }
}

#[test]
fn an_untouched_directory_verifies() {
    let setup = Setup::new();
    setup.sign();
    let result = setup.verify().expect("verifiable");
    assert!(result.passed(), "{:?}", result.problems);
    assert_eq!(result.files, 2);
    assert_eq!(result.key_id, setup.key("key").id());
}

#[test]
fn each_kind_of_change_is_named() {
    let setup = Setup::new();
    std::fs::write(setup.out().join("gone.txt"), "x").expect("write");
    setup.sign();
    std::fs::write(setup.out().join("model.bin"), [1u8, 2, 3, 5]).expect("flip");
    std::fs::write(setup.out().join("logs/log.jsonl"), "{").expect("truncate");
    std::fs::remove_file(setup.out().join("gone.txt")).expect("delete");
    std::fs::write(setup.out().join("logs/new.txt"), "x").expect("add");
    assert_eq!(
        setup.problems(),
        vec![
            Problem::Missing {
                path: "gone.txt".into()
            },
            Problem::Changed {
                path: "logs/log.jsonl".into(),
                detail: "size 11 -> 1".into()
            },
            Problem::Changed {
                path: "model.bin".into(),
                detail: "same size, other content".into()
            },
            Problem::Extra {
                path: "logs/new.txt".into()
            },
        ]
    );
}

#[test]
fn an_edited_manifest_fails_its_mac() {
    let setup = Setup::new();
    setup.sign();
    // Re-hash the changed file into the manifest, as a forger without the key would.
    std::fs::write(setup.out().join("model.bin"), [9u8, 9, 9, 9]).expect("write");
    let mut fingerprint = read(&setup.out()).expect("read");
    let (size, sha256) = sha256_file(&setup.out().join("model.bin")).expect("hash");
    for file in &mut fingerprint.manifest.files {
        if file.path == "model.bin" {
            (file.size, file.sha256) = (size, sha256.clone());
        }
    }
    write_json(&setup.out().join(FINGERPRINT_FILE), &fingerprint).expect("write");
    assert_eq!(setup.problems(), vec![Problem::Tampered]);
}

#[test]
fn another_key_is_refused_with_both_ids() {
    let setup = Setup::new();
    setup.sign();
    setup.write_key("key", "another-key-of-enough-length");
    let err = setup.verify().expect_err("wrong key");
    let text = err.to_string();
    assert!(matches!(err, VerifyError::WrongKey { .. }), "{text}");
    assert!(text.contains(setup.key("key").id()), "{text}");
    assert!(text.contains("key file key"), "{text}");
}

#[test]
fn a_key_file_the_fingerprint_names_for_itself_is_not_trusted() {
    let setup = Setup::new();
    setup.sign();
    let err = verify(&setup.out(), setup.root(), None).expect_err("untrusted");
    assert!(matches!(err, VerifyError::UntrustedKey { .. }), "{err}");
    assert!(
        err.to_string().contains("names its own key (key file key)"),
        "{err}"
    );
    // The workspace key and an environment variable are the verifier's own.
    assert!(is_verifiers_own(&KeySource::Workspace {
        path: WORKSPACE_KEY.into()
    }));
    assert!(!is_verifiers_own(&KeySource::Workspace {
        path: "elsewhere.key".into()
    }));
    assert!(is_verifiers_own(&KeySource::Env {
        name: DEFAULT_KEY_ENV.into()
    }));
}

#[test]
fn a_missing_key_is_named() {
    let setup = Setup::new();
    setup.sign();
    std::fs::remove_file(setup.root().join("key")).expect("delete key");
    let text = setup.verify().expect_err("no key").to_string();
    assert_eq!(text, "no HMAC key: key file key does not exist");
}

#[test]
fn a_key_file_others_can_read_is_refused() {
    let setup = Setup::new();
    let path = setup.root().join("key");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let err = load(&KeySource::File { path: "key".into() }, setup.root()).expect_err("exposed");
    assert!(
        matches!(err, KeyError::Exposed { mode: 0o644, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("chmod 600"), "{err}");
}

#[test]
fn a_short_key_is_refused() {
    let setup = Setup::new();
    setup.write_key("short", "tooshort");
    let err = load(
        &KeySource::File {
            path: "short".into(),
        },
        setup.root(),
    )
    .expect_err("short");
    assert!(matches!(err, KeyError::TooShort { len: 8, .. }), "{err}");
}

#[test]
fn the_key_appears_nowhere_it_is_written_or_shown() {
    let setup = Setup::new();
    setup.sign();
    let key = setup.key("key");
    let fingerprint = std::fs::read_to_string(setup.out().join(FINGERPRINT_FILE)).expect("read");
    assert!(!fingerprint.contains(SECRET));
    assert!(fingerprint.contains(key.id()));
    assert!(!format!("{key:?}").contains(SECRET));
}

#[test]
fn the_workspace_key_is_created_once_owner_only_and_git_ignored() {
    let setup = Setup::new();
    let (first, created) = workspace_key(setup.root(), true).expect("create");
    assert!(created);
    let (second, created_again) = workspace_key(setup.root(), true).expect("reuse");
    assert!(!created_again);
    assert_eq!(first.id(), second.id());
    let path = setup.root().join(WORKSPACE_KEY);
    let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let ignore = std::fs::read_to_string(path.with_file_name(".gitignore")).expect("ignore");
    assert_eq!(ignore, "*\n");
    let other = tempfile::tempdir().expect("temp dir");
    assert!(matches!(
        workspace_key(other.path(), false),
        Err(KeyError::Missing { .. })
    ));
}

#[test]
fn processes_creating_the_workspace_key_at_once_all_get_the_one_key() {
    // Each racer reads the key the moment another has created it: a file created first and
    // written after was read empty (a "too short" key) by the others.
    for _ in 0..20 {
        let setup = Setup::new();
        let root = setup.root().to_path_buf();
        let ids: Vec<String> = std::thread::scope(|scope| {
            let racers: Vec<_> = (0..8)
                .map(|_| {
                    scope.spawn(|| workspace_key(&root, true).map(|(key, _)| key.id().to_string()))
                })
                .collect();
            racers
                .into_iter()
                .map(|racer| racer.join().expect("no panic").expect("a usable key"))
                .collect()
        });
        assert!(ids.windows(2).all(|pair| pair[0] == pair[1]), "{ids:?}");
        let leftovers: Vec<_> = std::fs::read_dir(root.join(".finetune"))
            .expect("key dir")
            .map(|entry| entry.expect("entry").file_name())
            .filter(|name| name.to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
