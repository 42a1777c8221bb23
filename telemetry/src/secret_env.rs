//! Secrets from the environment or from a file a variable names (`NAME` or `NAME_FILE`,
//! the way Kubernetes mounts secrets), never from a command-line flag: a flag's value is
//! visible to anyone on the host through `ps` and `/proc/*/cmdline`.

use std::ffi::OsString;
use std::path::Path;

use crate::Secret;

/// A secret setting: its variable and the `_FILE` variable that may name a file holding
/// it instead. Build with [`secret_var!`](crate::secret_var).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SecretVar {
    /// The variable holding the value itself (`OPENAI_API_KEY`).
    pub name: &'static str,
    /// The variable naming a file that holds the value (`OPENAI_API_KEY_FILE`).
    pub file: &'static str,
    /// One line for `--help` and the docs: what the secret is.
    pub help: &'static str,
}

/// `secret_var!("NAME", "help")`: a [`SecretVar`] whose file variable is `NAME_FILE`.
#[macro_export]
macro_rules! secret_var {
    ($name:literal, $help:literal) => {
        $crate::SecretVar {
            name: $name,
            file: concat!($name, "_FILE"),
            help: $help,
        }
    };
}

/// Why a secret could not be read. Names the variable at fault, never the value.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {message}")]
pub struct SecretError {
    /// The variable at fault (`NAME` or `NAME_FILE`).
    pub var: &'static str,
    /// What is wrong.
    pub message: String,
}

/// Reads `var` from `env` (the process environment in the binaries, a map in tests).
///
/// `NAME` and `NAME_FILE` set together is an error naming both (which one should win is
/// a guess either way). A file that cannot be read, or is not UTF-8, is an error naming
/// `NAME_FILE` and the path. A file's trailing line breaks are dropped (editors and
/// `echo` add one; no token ends in one). A variable set to the empty string counts as
/// unset, as it does for every other setting.
pub fn read_secret(
    var: &SecretVar,
    env: &dyn Fn(&str) -> Option<OsString>,
) -> Result<Option<Secret>, SecretError> {
    let set = |name: &str| env(name).filter(|v| !v.is_empty());
    match (set(var.name), set(var.file)) {
        (Some(_), Some(_)) => Err(SecretError {
            var: var.name,
            message: format!("set either {} or {}, not both", var.name, var.file),
        }),
        (Some(value), None) => value
            .into_string()
            .map(|v| Some(Secret::new(v)))
            .map_err(|_| SecretError {
                var: var.name,
                message: "is not valid UTF-8".to_owned(),
            }),
        (None, Some(path)) => read_file(var, Path::new(&path)).map(Some),
        (None, None) => Ok(None),
    }
}

fn read_file(var: &SecretVar, path: &Path) -> Result<Secret, SecretError> {
    let fail = |why: String| SecretError {
        var: var.file,
        message: format!("cannot use {}: {why}", path.display()),
    };
    // The io error says why (missing, permission) and never carries the file's content.
    let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let text = String::from_utf8(bytes).map_err(|_| fail("not valid UTF-8".to_owned()))?;
    Ok(Secret::new(text.trim_end_matches(['\n', '\r'])))
}

/// The process environment, as [`read_secret`] takes it.
pub fn process_env(name: &str) -> Option<OsString> {
    std::env::var_os(name)
}

/// The `--help` section listing `vars` (they are not flags, so clap does not list them).
pub fn secrets_help(vars: &[SecretVar]) -> String {
    let mut help = String::from(
        "Secrets (read from the environment, or from the file NAME_FILE names; never flags):\n",
    );
    for var in vars {
        help.push_str(&format!(
            "  {}, {}\n      {}\n",
            var.name, var.file, var.help
        ));
    }
    help
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const KEY: SecretVar = crate::secret_var!("TEST_API_KEY", "a key");

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + use<> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn temp_file(name: &str, content: &[u8]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("secret-env-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(name);
        std::fs::write(&path, content).expect("write");
        path
    }

    #[test]
    fn the_file_variable_is_the_name_plus_file() {
        assert_eq!(KEY.file, "TEST_API_KEY_FILE");
    }

    #[test]
    fn a_value_comes_from_the_variable_as_is() {
        let got = read_secret(&KEY, &env_of(&[("TEST_API_KEY", "sk-1 \n")])).expect("ok");
        assert_eq!(got.expect("set").expose(), "sk-1 \n");
        assert!(read_secret(&KEY, &env_of(&[])).expect("ok").is_none());
        let empty = env_of(&[("TEST_API_KEY", ""), ("TEST_API_KEY_FILE", "")]);
        assert!(read_secret(&KEY, &empty).expect("ok").is_none());
    }

    #[test]
    fn a_file_is_read_and_its_trailing_line_breaks_dropped() {
        for (name, content) in [
            ("lf", &b"sk-from-file\n"[..]),
            ("crlf", b"sk-from-file\r\n"),
            ("none", b"sk-from-file"),
        ] {
            let path = temp_file(name, content);
            let env = env_of(&[("TEST_API_KEY_FILE", path.to_str().expect("utf-8"))]);
            let got = read_secret(&KEY, &env).expect("ok").expect("set");
            assert_eq!(got.expose(), "sk-from-file", "{name}");
        }
        // Inner line breaks are the value's own (a list of tokens, a PEM).
        let path = temp_file("inner", b"a\nb\n\n");
        let env = env_of(&[("TEST_API_KEY_FILE", path.to_str().expect("utf-8"))]);
        let got = read_secret(&KEY, &env).expect("ok").expect("set");
        assert_eq!(got.expose(), "a\nb");
    }

    #[test]
    fn both_set_is_refused_naming_both() {
        let path = temp_file("both", b"sk-from-file\n");
        let env = env_of(&[
            ("TEST_API_KEY", "sk-inline"),
            ("TEST_API_KEY_FILE", path.to_str().expect("utf-8")),
        ]);
        let err = read_secret(&KEY, &env).expect_err("both").to_string();
        assert!(
            err.contains("TEST_API_KEY ") && err.contains("TEST_API_KEY_FILE"),
            "{err}"
        );
        assert!(!err.contains("sk-inline") && !err.contains("sk-from-file"));
    }

    #[test]
    fn an_unreadable_file_names_the_file_variable_never_the_value() {
        let env = env_of(&[("TEST_API_KEY_FILE", "/nonexistent/secret")]);
        let err = read_secret(&KEY, &env).expect_err("missing");
        assert_eq!(err.var, "TEST_API_KEY_FILE");
        assert!(err.to_string().contains("/nonexistent/secret"), "{err}");
        let path = temp_file("latin1", b"sk-\xe9t\xe9-secret\n");
        let env = env_of(&[("TEST_API_KEY_FILE", path.to_str().expect("utf-8"))]);
        let err = read_secret(&KEY, &env).expect_err("not utf-8").to_string();
        assert!(
            err.contains("TEST_API_KEY_FILE") && err.contains("UTF-8"),
            "{err}"
        );
        assert!(!err.contains("secret\n") && !err.contains("sk-"), "{err}");
        // A directory is not a file either.
        let dir = std::env::temp_dir();
        let env = env_of(&[("TEST_API_KEY_FILE", dir.to_str().expect("utf-8"))]);
        assert_eq!(
            read_secret(&KEY, &env).expect_err("dir").var,
            "TEST_API_KEY_FILE"
        );
    }

    #[test]
    fn help_lists_both_variables() {
        let help = secrets_help(&[KEY]);
        assert!(help.contains("TEST_API_KEY, TEST_API_KEY_FILE") && help.contains("a key"));
    }
}
