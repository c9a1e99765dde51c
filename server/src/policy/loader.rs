//! Policy files and directories → one validated policy set.
//!
//! Each file is parsed and validated on its own against the schema, so that
//! every error names its file, line and column. A policy's id is its
//! `@id("...")` annotation, else `<file>:<index>` (index from 0 in the
//! file). Ids must be unique across all loaded files.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use cedar_policy::{PolicyId, PolicySet, ValidationMode, Validator};
use mayfly::ttl::Ttl;
use miette::Diagnostic;

use super::schema;

/// The built-in policies (`mayfly.default.*`).
pub const DEFAULT_POLICY: &str = include_str!("default.cedar");
/// The name the built-in policies are reported under.
pub const DEFAULT_SOURCE: &str = "<built-in default.cedar>";
/// The annotation that caps the TTL of credentials a permit allows.
pub const MAX_TTL_ANNOTATION: &str = "max_ttl";
/// The annotation that names a policy.
pub const ID_ANNOTATION: &str = "id";

/// One problem in a policy file, with its position when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    /// The file (or [`DEFAULT_SOURCE`]).
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "{}:{l}:{c}: {}", self.file, self.message),
            (Some(l), None) => write!(f, "{}:{l}: {}", self.file, self.message),
            _ => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// Every problem found while loading; nothing was loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid policy: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct LoadErrors(pub Vec<LoadError>);

/// Where policies come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySources {
    /// Files, or directories whose `*.cedar` files are loaded (sorted by name).
    pub paths: Vec<PathBuf>,
    /// Whether the built-in set is loaded too.
    pub default_policy: bool,
}

impl Default for PolicySources {
    fn default() -> Self {
        Self {
            paths: Vec::new(),
            default_policy: true,
        }
    }
}

/// A policy file's text, as read.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// How the file is named in errors and policy ids.
    pub name: String,
    /// Its text.
    pub text: String,
}

/// A loaded, validated policy set with what the engine needs about it.
#[derive(Debug, Clone)]
pub struct LoadedPolicies {
    /// The policies, with their final ids.
    pub set: PolicySet,
    /// TTL caps of the policies annotated `@max_ttl`.
    pub ttl_caps: HashMap<PolicyId, Ttl>,
}

impl LoadedPolicies {
    /// How many policies were loaded.
    pub fn len(&self) -> usize {
        self.set.num_of_policies()
    }

    /// Whether no policy was loaded.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

/// Reads the files that `sources` name (directories: their `*.cedar` files,
/// sorted), without the built-in set.
pub fn read_sources(sources: &PolicySources) -> Result<Vec<SourceFile>, LoadErrors> {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    let io_error = |path: &Path, e: std::io::Error| LoadError {
        file: path.display().to_string(),
        line: None,
        column: None,
        message: format!("cannot read: {e}"),
    };
    for path in &sources.paths {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) => {
                errors.push(io_error(path, e));
                continue;
            }
        };
        let mut paths = Vec::new();
        if meta.is_dir() {
            match std::fs::read_dir(path) {
                Ok(dir) => {
                    for item in dir {
                        match item {
                            Ok(item) => {
                                let p = item.path();
                                if p.extension().is_some_and(|x| x == "cedar") && p.is_file() {
                                    paths.push(p);
                                }
                            }
                            Err(e) => errors.push(io_error(path, e)),
                        }
                    }
                }
                Err(e) => errors.push(io_error(path, e)),
            }
            paths.sort();
        } else {
            paths.push(path.clone());
        }
        for p in paths {
            match std::fs::read_to_string(&p) {
                Ok(text) => files.push(SourceFile {
                    name: p.display().to_string(),
                    text,
                }),
                Err(e) => errors.push(io_error(&p, e)),
            }
        }
    }
    if errors.is_empty() {
        Ok(files)
    } else {
        Err(LoadErrors(errors))
    }
}

/// Reads and compiles everything `sources` name, built-in set included
/// when asked.
pub fn load(sources: &PolicySources) -> Result<LoadedPolicies, LoadErrors> {
    let files = read_sources(sources)?;
    compile(sources.default_policy, &files)
}

/// Compiles files (and the built-in set when `default_policy`) into one
/// validated set. Every error of every file is reported.
pub fn compile(default_policy: bool, files: &[SourceFile]) -> Result<LoadedPolicies, LoadErrors> {
    let builtin = SourceFile {
        name: DEFAULT_SOURCE.into(),
        text: DEFAULT_POLICY.into(),
    };
    let all = default_policy
        .then_some(&builtin)
        .into_iter()
        .chain(files.iter());
    let mut set = PolicySet::new();
    let mut ttl_caps = HashMap::new();
    let mut errors = Vec::new();
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for file in all {
        match compile_file(file) {
            Ok((file_set, caps)) => {
                for policy in file_set.policies() {
                    let id = policy.id().to_string();
                    if let Some(first) = seen.get(&id) {
                        let pos = policy_position(file, policy);
                        errors.push(LoadError {
                            file: file.name.clone(),
                            line: pos.map(|p| p.0),
                            column: pos.map(|p| p.1),
                            message: format!("policy id {id:?} is already used in {first}"),
                        });
                        continue;
                    }
                    seen.insert(id, file.name.clone());
                    if let Err(e) = set.add(policy.clone()) {
                        errors.push(whole_file(&file.name, e.to_string()));
                    }
                }
                ttl_caps.extend(caps);
            }
            Err(mut e) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        Ok(LoadedPolicies { set, ttl_caps })
    } else {
        Err(LoadErrors(errors))
    }
}

fn whole_file(file: &str, message: String) -> LoadError {
    LoadError {
        file: file.to_owned(),
        line: None,
        column: None,
        message,
    }
}

/// Errors of a diagnostic, one per label (or one without position).
fn diagnostic_errors(file: &SourceFile, d: &dyn Diagnostic, message: String) -> Vec<LoadError> {
    let help = d.help().map(|h| format!(" ({h})")).unwrap_or_default();
    let offsets: Vec<usize> = d
        .labels()
        .map(|labels| labels.map(|l| l.offset()).collect())
        .unwrap_or_default();
    match offsets.first() {
        Some(&offset) => {
            let (line, column) = line_col(&file.text, offset);
            vec![LoadError {
                file: file.name.clone(),
                line: Some(line),
                column: Some(column),
                message: format!("{message}{help}"),
            }]
        }
        None => vec![whole_file(&file.name, format!("{message}{help}"))],
    }
}

/// Parses and validates one file; renames its policies to their final ids
/// and reads their `@max_ttl` caps.
fn compile_file(file: &SourceFile) -> Result<(PolicySet, HashMap<PolicyId, Ttl>), Vec<LoadError>> {
    let schema = schema::schema().map_err(|e| vec![whole_file(&file.name, e.to_owned())])?;
    let parsed: PolicySet = file.text.parse().map_err(|e: cedar_policy::ParseErrors| {
        e.iter()
            .flat_map(|err| diagnostic_errors(file, err, err.to_string()))
            .collect::<Vec<_>>()
    })?;
    let mut errors = Vec::new();
    if parsed.templates().next().is_some() {
        errors.push(whole_file(
            &file.name,
            "policy templates (?principal, ?resource) are not supported".into(),
        ));
    }
    // `from_str` names policies policy0, policy1, ... in file order.
    let mut policies: Vec<_> = parsed.policies().collect();
    policies.sort_by_key(|p| {
        p.id()
            .to_string()
            .strip_prefix("policy")
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(usize::MAX)
    });
    let mut set = PolicySet::new();
    let mut caps = HashMap::new();
    for (index, policy) in policies.into_iter().enumerate() {
        let pos = policy_position(file, policy);
        let at = |message: String| LoadError {
            file: file.name.clone(),
            line: pos.map(|p| p.0),
            column: pos.map(|p| p.1),
            message,
        };
        let id = match policy.annotation(ID_ANNOTATION) {
            Some(id) if !id.trim().is_empty() => id.trim().to_owned(),
            Some(_) => {
                errors.push(at("@id must not be empty".into()));
                continue;
            }
            None => format!("{}:{index}", file.name),
        };
        let id = PolicyId::new(id);
        if let Some(cap) = policy.annotation(MAX_TTL_ANNOTATION) {
            match cap.parse::<Ttl>() {
                Ok(ttl) if policy.effect() == cedar_policy::Effect::Permit => {
                    caps.insert(id.clone(), ttl);
                }
                Ok(_) => errors.push(at("@max_ttl applies only to permit policies".into())),
                Err(e) => errors.push(at(format!("@max_ttl({cap:?}): {e}"))),
            }
        }
        if let Err(e) = set.add(policy.new_id(id.clone())) {
            errors.push(at(format!("policy {id}: {e}")));
        }
    }
    let validation = Validator::new(schema.clone()).validate(&set, ValidationMode::Strict);
    for err in validation.validation_errors() {
        errors.extend(diagnostic_errors(
            file,
            err,
            format!("policy {}: {err}", err.policy_id()),
        ));
    }
    if errors.is_empty() {
        Ok((set, caps))
    } else {
        Err(errors)
    }
}

/// Where a policy starts in its file (found by its original text).
fn policy_position(file: &SourceFile, policy: &cedar_policy::Policy) -> Option<(usize, usize)> {
    let text = policy.to_cedar()?;
    file.text.find(text.trim()).map(|o| line_col(&file.text, o))
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}
