//! Loading a policy directory: every `*.cedar` file, parsed, given stable
//! ids, checked for known annotations and validated against the built-in
//! schema. Errors name the file, line and column, with Cedar's message.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use cedar_policy::{Effect, PolicyId, PolicySet, Schema, ValidationMode, Validator};
use miette::Diagnostic;

use super::{Action, CompiledSet, PolicyMeta};

/// The schema every policy set is validated against, and the request
/// context the proxy builds (the file ships in `config/policies/`).
pub const SCHEMA_TEXT: &str = include_str!("../../config/policies/portcullis.cedarschema");

/// Annotations a policy may carry; anything else is a typo and an error.
pub const ANNOTATIONS: &[&str] = &[
    "id",
    "action",
    "acr",
    "max_age",
    "session_ttl",
    "reason",
    "revoke",
];

/// One problem in one policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line (0 when unknown).
    pub line: usize,
    /// 1-based column (0 when unknown).
    pub column: usize,
    /// What is wrong (Cedar's message for parse and validation errors).
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.column,
                self.message
            )
        }
    }
}

/// Why a policy set could not be loaded; the running set (if any) stays.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The directory or a file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// What.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The directory holds no `*.cedar` file.
    #[error("{}: no *.cedar policy files", .0.display())]
    Empty(PathBuf),
    /// The built-in schema does not parse (a build defect).
    #[error("built-in schema: {0}")]
    Schema(String),
    /// Parse, annotation or validation errors, each with file and line.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<PolicyError>),
}

/// Parses the built-in schema.
pub fn schema() -> Result<Schema, LoadError> {
    Schema::from_cedarschema_str(SCHEMA_TEXT)
        .map(|(s, _warnings)| s)
        .map_err(|e| LoadError::Schema(e.to_string()))
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(offset, |n| offset - n - 1) + 1;
    (line, col)
}

/// Start offsets of each policy in a file: the first character after the
/// previous top-level `;` that is not blank or inside a comment.
fn policy_starts(text: &str) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut cur: Option<usize> = None;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '/' if chars.peek().is_some_and(|(_, n)| *n == '/') => {
                for (_, c) in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '"' => {
                cur.get_or_insert(i);
                while let Some((_, c)) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            ';' => {
                starts.push(cur.take().unwrap_or(i));
            }
            c if c.is_whitespace() => {}
            _ => {
                cur.get_or_insert(i);
            }
        }
    }
    starts
}

fn diag_error(file: &Path, text: &str, d: &dyn Diagnostic, fallback: usize) -> PolicyError {
    let offset = d
        .labels()
        .and_then(|mut l| l.next())
        .map_or(fallback, |l| l.offset());
    let (line, column) = line_col(text, offset);
    let mut message = d.to_string();
    if let Some(h) = d.help() {
        message.push_str(&format!(" (help: {h})"));
    }
    PolicyError {
        file: file.to_owned(),
        line,
        column,
        message,
    }
}

/// The `*.cedar` files of a directory, sorted by name.
pub fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let rd = std::fs::read_dir(dir).map_err(|source| LoadError::Read {
        path: dir.to_owned(),
        source,
    })?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "cedar") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

struct Parsed {
    meta: PolicyMeta,
    policy: cedar_policy::Policy,
    text_index: usize,
    offset: usize,
}

/// Loads and validates every `*.cedar` file in `dir`.
pub fn load_dir(dir: &Path) -> Result<CompiledSet, LoadError> {
    let files = policy_files(dir)?;
    if files.is_empty() {
        return Err(LoadError::Empty(dir.to_owned()));
    }
    let mut sources = Vec::with_capacity(files.len());
    for f in &files {
        let text = std::fs::read_to_string(f).map_err(|source| LoadError::Read {
            path: f.clone(),
            source,
        })?;
        sources.push((f.clone(), text));
    }
    load_sources(&sources)
}

/// Loads a set from in-memory `(file name, text)` pairs (tests, benches).
pub fn load_sources(sources: &[(PathBuf, String)]) -> Result<CompiledSet, LoadError> {
    let schema = Arc::new(schema()?);
    let mut errors = Vec::new();
    let mut parsed: Vec<Parsed> = Vec::new();
    for (ti, (file, text)) in sources.iter().enumerate() {
        let set = match PolicySet::from_str(text) {
            Ok(s) => s,
            Err(e) => {
                for pe in e.iter() {
                    errors.push(diag_error(file, text, pe, 0));
                }
                continue;
            }
        };
        if set.templates().next().is_some() {
            errors.push(PolicyError {
                file: file.clone(),
                line: 0,
                column: 0,
                message: "templates (`?principal`, `?resource`) are not supported".into(),
            });
            continue;
        }
        let starts = policy_starts(text);
        let mut in_file: Vec<(usize, &cedar_policy::Policy)> = set
            .policies()
            .map(|p| {
                let n = p
                    .id()
                    .to_string()
                    .strip_prefix("policy")
                    .and_then(|n| n.parse::<usize>().ok())
                    .unwrap_or(usize::MAX);
                (n, p)
            })
            .collect();
        in_file.sort_by_key(|(n, _)| *n);
        for (n, p) in in_file {
            let offset = starts.get(n).copied().unwrap_or(0);
            let (line, column) = line_col(text, offset);
            let at = |message: String| PolicyError {
                file: file.clone(),
                line,
                column,
                message,
            };
            match meta_of(p, file, line) {
                Ok(meta) => parsed.push(Parsed {
                    policy: p.new_id(PolicyId::new(&meta.id)),
                    meta,
                    text_index: ti,
                    offset,
                }),
                Err(m) => errors.push(at(m)),
            }
        }
    }
    // Ids are unique across the set.
    let mut seen: HashMap<&str, &PolicyMeta> = HashMap::new();
    for p in &parsed {
        if let Some(first) = seen.insert(p.meta.id.as_str(), &p.meta) {
            let (line, column) = line_col(&sources[p.text_index].1, p.offset);
            errors.push(PolicyError {
                file: sources[p.text_index].0.clone(),
                line,
                column,
                message: format!(
                    "duplicate policy id `{}` (first at {}:{})",
                    p.meta.id, first.file, first.line
                ),
            });
        }
    }
    if !errors.is_empty() {
        return Err(LoadError::Invalid(errors));
    }
    let mut set = PolicySet::new();
    let mut meta = HashMap::new();
    let mut where_: HashMap<String, usize> = HashMap::new();
    for (i, p) in parsed.into_iter().enumerate() {
        where_.insert(p.meta.id.clone(), i);
        if let Err(e) = set.add(p.policy) {
            errors.push(PolicyError {
                file: sources[p.text_index].0.clone(),
                line: p.meta.line,
                column: 1,
                message: e.to_string(),
            });
        }
        meta.insert(PolicyId::new(&p.meta.id), (Arc::new(p.meta), p.text_index));
    }
    if !errors.is_empty() {
        return Err(LoadError::Invalid(errors));
    }
    let validator = Validator::new((*schema).clone());
    let result = validator.validate(&set, ValidationMode::Strict);
    for e in result.validation_errors() {
        let (file, text, line) = match meta.get(e.policy_id()) {
            Some((m, ti)) => (&sources[*ti].0, sources[*ti].1.as_str(), m.line),
            None => (&sources[0].0, "", 0),
        };
        let mut pe = diag_error(file, text, e, 0);
        if pe.line == 0 || text.is_empty() {
            pe.line = line;
        }
        // The validator reports a problem once per action (read, write).
        if errors
            .iter()
            .any(|x| x.file == pe.file && x.line == pe.line && x.column == pe.column)
        {
            continue;
        }
        pe.message = format!("policy `{}`: {}", e.policy_id(), pe.message);
        errors.push(pe);
    }
    if !errors.is_empty() {
        return Err(LoadError::Invalid(errors));
    }
    let version = {
        let mut h = Vec::new();
        for (f, t) in sources {
            h.extend_from_slice(f.file_name().map_or(&[][..], |n| n.as_encoded_bytes()));
            h.push(0);
            h.extend_from_slice(t.as_bytes());
            h.push(0);
        }
        hex::encode(&crate::util::sha256(&h)[..6])
    };
    CompiledSet::new(
        set,
        meta.into_iter().map(|(k, (m, _))| (k, m)).collect(),
        schema,
        version,
        sources.iter().map(|(f, _)| f.clone()).collect(),
    )
    .map_err(LoadError::Schema)
}

/// Reads and checks a policy's annotations.
fn meta_of(p: &cedar_policy::Policy, file: &Path, line: usize) -> Result<PolicyMeta, String> {
    for (k, _) in p.annotations() {
        if !ANNOTATIONS.contains(&k) {
            return Err(format!(
                "unknown annotation `@{k}`; use one of {}",
                ANNOTATIONS
                    .iter()
                    .map(|a| format!("@{a}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    let file_name = file.file_name().map_or_else(
        || file.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let id = match p.annotation("id") {
        Some(id) if id.trim().is_empty() => return Err("`@id` must not be empty".into()),
        Some(id) => id.to_owned(),
        None => format!("{file_name}:{line}"),
    };
    let forbid = p.effect() == Effect::Forbid;
    let action = match p.annotation("action") {
        None if forbid => Action::Deny,
        None => Action::Allow,
        Some(a) => {
            let action = Action::parse(a).ok_or_else(|| {
                format!(
                    "`@action(\"{a}\")` is not one of allow, restrict, shorten, step_up, deny, revoke"
                )
            })?;
            if forbid && action != Action::Deny {
                return Err(format!(
                    "a `forbid` policy always denies; remove `@action(\"{a}\")` or make it a `permit`"
                ));
            }
            action
        }
    };
    let num = |key: &str| -> Result<Option<u64>, String> {
        match p.annotation(key) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse::<u64>()
                .map(Some)
                .map_err(|_| format!("`@{key}(\"{v}\")` must be a whole number of seconds")),
        }
    };
    let acr: Vec<String> = p
        .annotation("acr")
        .map(|a| a.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let max_age_s = num("max_age")?;
    let session_ttl_s = num("session_ttl")?;
    let only_on = |key: &str, present: bool, want: Action| -> Result<(), String> {
        if present && action != want {
            return Err(format!(
                "`@{key}` only applies to `@action(\"{}\")`",
                want.as_str()
            ));
        }
        Ok(())
    };
    only_on("acr", p.annotation("acr").is_some(), Action::StepUp)?;
    only_on("max_age", max_age_s.is_some(), Action::StepUp)?;
    if session_ttl_s.is_some() && action != Action::Shorten && action != Action::StepUp {
        return Err(
            "`@session_ttl` only applies to `@action(\"shorten\")` and `@action(\"step_up\")`"
                .into(),
        );
    }
    if session_ttl_s == Some(0) {
        return Err("`@session_ttl` must be at least 1 second".into());
    }
    only_on("revoke", p.annotation("revoke").is_some(), Action::Revoke)?;
    if action == Action::StepUp && acr.is_empty() && max_age_s.is_none() {
        return Err("`@action(\"step_up\")` needs `@acr(\"…\")`, `@max_age(\"…\")` or both".into());
    }
    if action == Action::Shorten && session_ttl_s.is_none_or(|t| t == 0) {
        return Err(
            "`@action(\"shorten\")` needs `@session_ttl(\"<seconds>\")` of at least 1".into(),
        );
    }
    let (revoke_subject, revoke_device) = match (action, p.annotation("revoke")) {
        (Action::Revoke, Some(r)) => {
            let mut s = false;
            let mut d = false;
            for part in r.split([',', ' ']).filter(|x| !x.is_empty()) {
                match part {
                    "subject" => s = true,
                    "device" => d = true,
                    other => {
                        return Err(format!(
                            "`@revoke` names `{other}`; use \"subject\", \"device\" or \"subject, device\""
                        ));
                    }
                }
            }
            if !s && !d {
                return Err("`@revoke` must name \"subject\", \"device\" or both".into());
            }
            (s, d)
        }
        (Action::Revoke, None) => {
            return Err(
                "`@action(\"revoke\")` needs `@revoke(\"subject\")`, `@revoke(\"device\")` or both"
                    .into(),
            );
        }
        _ => (false, false),
    };
    let reason = p
        .annotation("reason")
        .map(str::to_owned)
        .unwrap_or_else(|| format!("policy `{id}`"));
    Ok(PolicyMeta {
        id,
        action,
        acr,
        max_age_s,
        session_ttl_s,
        reason,
        revoke_subject,
        revoke_device,
        file: file_name,
        line,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn policy_starts_skip_comments_and_strings() {
        let t = "// a; comment\n@id(\"x;y\")\npermit(principal, action, resource);\n\n  forbid(principal, action, resource) when { \"a;b\" == \"c\" };\n";
        let s = policy_starts(t);
        assert_eq!(s.len(), 2);
        assert_eq!(line_col(t, s[0]), (2, 1));
        assert_eq!(line_col(t, s[1]), (5, 3));
    }
}
