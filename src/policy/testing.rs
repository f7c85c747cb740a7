//! `portcullis policy test DIR`: policies tested as data, like `opa test`.
//!
//! Every `DIR/tests/*.toml` file holds `[[case]]` tables: the request and
//! snapshot facts (any field of [`Inputs`]; unset fields take the healthy
//! defaults — an active employee on a managed, compliant laptop reading a
//! medium route) and what the set must decide:
//!
//! ```toml
//! [[case]]
//! name = "noncompliant laptop, medium route: read-only"
//! method = "POST"
//! device = { compliant = false, compliance = "non_compliant" }
//! expect = { action = "restrict", policies = ["noncompliant-restrict"] }
//! ```
//!
//! `expect.action` is required; `policies`, `reasons`, `acr_values`,
//! `max_age_s`, `session_ttl_s` and `revoke` are compared when given.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::facts::{
    AuthFacts, DeviceFacts, IdentityFacts, Limits, MethodClass, NetworkFacts, Principal,
    RouteFacts, SnapshotFacts, TimeFacts, WorkloadFacts,
};
use super::{Action, CompiledSet, Decision, Inputs, LoadError, load_dir};

/// What a case expects.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// The action.
    pub action: Action,
    /// Exactly these policy ids (any order).
    #[serde(default)]
    pub policies: Option<Vec<String>>,
    /// Exactly these reasons (any order).
    #[serde(default)]
    pub reasons: Option<Vec<String>>,
    /// Step-up acr values.
    #[serde(default)]
    pub acr_values: Option<Vec<String>>,
    /// Step-up max_age.
    #[serde(default)]
    pub max_age_s: Option<u64>,
    /// Shorten cap.
    #[serde(default)]
    pub session_ttl_s: Option<u64>,
    /// Revoke targets.
    #[serde(default)]
    pub revoke: Option<Vec<String>>,
}

/// One test case.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Case {
    /// Shown in the report.
    pub name: String,
    /// The expectation.
    pub expect: Expect,
    /// An HTTP method; sets `action` (GET/HEAD/OPTIONS = read).
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub principal: Principal,
    #[serde(default)]
    pub action: Option<MethodClass>,
    #[serde(default)]
    pub route: RouteFacts,
    #[serde(default)]
    pub device: DeviceFacts,
    #[serde(default)]
    pub identity: IdentityFacts,
    #[serde(default)]
    pub auth: AuthFacts,
    #[serde(default)]
    pub network: NetworkFacts,
    #[serde(default)]
    pub workload: WorkloadFacts,
    #[serde(default)]
    pub time: TimeFacts,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub session: super::facts::SessionFacts,
    #[serde(default)]
    pub snapshot: SnapshotFacts,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    case: Vec<Case>,
}

impl Case {
    /// The inputs this case describes.
    pub fn inputs(&self) -> Result<Inputs, String> {
        let action = match (&self.method, self.action) {
            (Some(m), _) => MethodClass::of(
                &http::Method::from_bytes(m.as_bytes())
                    .map_err(|_| format!("`{m}` is not an HTTP method"))?,
            ),
            (None, Some(a)) => a,
            (None, None) => MethodClass::Read,
        };
        let mut device = self.device.clone();
        // As the proxy does: posture older than the window is stale.
        device.stale |= device.posture_age_s > self.limits.posture_max_age_s;
        Ok(Inputs {
            principal: self.principal.clone(),
            action,
            route: self.route.clone(),
            device,
            identity: self.identity.clone(),
            auth: self.auth.clone(),
            network: self.network.clone(),
            workload: self.workload.clone(),
            time: self.time.clone(),
            limits: self.limits.clone(),
            session: self.session.clone(),
            snapshot: self.snapshot.clone(),
        })
    }

    /// Differences between the expectation and a decision (empty = pass).
    pub fn check(&self, d: &Decision) -> Vec<String> {
        let e = &self.expect;
        let mut out = Vec::new();
        if d.action != e.action {
            out.push(format!(
                "action: want {}, got {}",
                e.action.as_str(),
                d.action.as_str()
            ));
        }
        let same = |a: &[String], b: &[String]| {
            let mut a = a.to_vec();
            let mut b = b.to_vec();
            a.sort();
            b.sort();
            a == b
        };
        let mut list = |what: &str, want: &Option<Vec<String>>, got: &[String]| {
            if let Some(w) = want
                && !same(w, got)
            {
                out.push(format!("{what}: want {w:?}, got {got:?}"));
            }
        };
        list("policies", &e.policies, &d.policy_ids);
        list("reasons", &e.reasons, &d.reasons);
        list("acr_values", &e.acr_values, &d.acr_values);
        list("revoke", &e.revoke, &d.revoke);
        if e.max_age_s.is_some() && e.max_age_s != d.max_age_s {
            out.push(format!(
                "max_age_s: want {:?}, got {:?}",
                e.max_age_s, d.max_age_s
            ));
        }
        if e.session_ttl_s.is_some() && e.session_ttl_s != d.session_ttl_s {
            out.push(format!(
                "session_ttl_s: want {:?}, got {:?}",
                e.session_ttl_s, d.session_ttl_s
            ));
        }
        out
    }
}

/// The result of a run.
#[derive(Debug, Default)]
pub struct Report {
    /// Cases that passed.
    pub passed: usize,
    /// Cases that failed, with why.
    pub failed: Vec<String>,
    /// Printable lines, in order.
    pub lines: Vec<String>,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    /// The policy set did not load.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A test file could not be read or parsed.
    #[error("{}: {message}", file.display())]
    File {
        /// The file.
        file: PathBuf,
        /// Why.
        message: String,
    },
    /// No test files.
    #[error("{}: no test files (*.toml)", .0.display())]
    NoTests(PathBuf),
}

/// The test files for a policy directory: `DIR/tests/*.toml`, sorted.
pub fn test_files(dir: &Path) -> Result<Vec<PathBuf>, TestError> {
    let tests = dir.join("tests");
    let rd = std::fs::read_dir(&tests).map_err(|e| TestError::File {
        file: tests.clone(),
        message: format!("cannot read: {e}"),
    })?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(TestError::NoTests(tests));
    }
    Ok(files)
}

/// Runs every case of `files` against `set`.
pub fn run(set: &CompiledSet, files: &[PathBuf]) -> Result<Report, TestError> {
    let mut r = Report::default();
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|e| TestError::File {
            file: f.clone(),
            message: format!("cannot read: {e}"),
        })?;
        let parsed: File = toml::from_str(&text).map_err(|e| TestError::File {
            file: f.clone(),
            message: e.to_string().trim_end().replace('\n', " | "),
        })?;
        let short = f
            .file_name()
            .map_or_else(|| f.display().to_string(), |n| n.to_string_lossy().into());
        for case in &parsed.case {
            let diffs = match case.inputs() {
                Ok(inputs) => case.check(&set.evaluate(&inputs)),
                Err(e) => vec![e],
            };
            if diffs.is_empty() {
                r.passed += 1;
                r.lines.push(format!("PASS {short}: {}", case.name));
            } else {
                let msg = format!("FAIL {short}: {}\n  {}", case.name, diffs.join("\n  "));
                r.lines.push(msg.clone());
                r.failed.push(msg);
            }
        }
    }
    Ok(r)
}

/// Loads `dir` and runs its tests.
pub fn run_dir(dir: &Path) -> Result<Report, TestError> {
    let set = load_dir(dir)?;
    let files = test_files(dir)?;
    run(&set, &files)
}
