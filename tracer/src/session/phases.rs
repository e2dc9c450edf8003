//! Request phases from user rules (`record --phase NAME=LIB:SYMBOL`): parsing a rule, finding
//! its function in the target's files, and what the kernel's phase ids stand for. Entering the
//! function puts the calling thread in phase NAME until it returns (nested rules stack); every
//! allocation, free and mapping the thread makes meanwhile carries the phase
//! (`tracer-ebpf/src/phase.rs`: an entry probe, and no return probe, whose trampoline would hide
//! the function's caller from every stack and end a C++ process that throws through it). The
//! probe is attached for every process mapping the file and kept in the kernel for the traced
//! ones only, so that children have their phases from their first instruction.

use std::{
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
};

use tracer_common::phase::{self, MAX_RULES};

use super::phase_predicate::{self, Predicate};
use crate::{
    cuda::PHASE_GRAPH_CAPTURE,
    elf::{self, Elf},
    escape,
    hooks::PROFILES,
    model::{PHASE_IDLE, PHASE_NONE, PHASE_PRE_ATTACH},
    proc::maps::{self, Mapping},
};

/// `s` as a terminal may show it (a rule's text may come from anywhere).
fn printable(s: &str) -> String {
    escape::for_terminal(s).into_owned()
}

/// Phases alloctrace names itself: a rule may not take their names.
pub const BUILT_IN: [&str; 4] = [
    PHASE_NONE,
    PHASE_GRAPH_CAPTURE,
    PHASE_PRE_ATTACH,
    PHASE_IDLE,
];

/// `record --idle-after`'s default, in ms.
pub const IDLE_AFTER_MS: u32 = 1000;

/// Longest phase name.
const NAME_MAX: usize = 32;

/// `NAME=LIB:SYMBOL` (a native function) or `NAME=py:MODULE:QUALNAME` (a Python function), as
/// given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhaseRule {
    pub name: String,
    /// A path, or the file name of an object the target maps (its executable included); `py`
    /// for a Python function.
    pub lib: String,
    /// The native function's symbol; for a Python function, `MODULE:QUALNAME`.
    pub symbol: String,
    /// A native rule's condition on the call (`[sp+8:i32>1]` after the symbol).
    pub predicate: Option<Predicate>,
    /// `NAME=usdt:LIB:PROVIDER:PROBE`: `symbol` is `PROVIDER:PROBE`, a USDT probe of LIB
    /// (`.note.stapsdt`); the phase lasts from the probe until the function around it returns.
    pub usdt: bool,
}

/// The `lib` of a Python function's rule.
const PYTHON_LIB: &str = "py";

/// What a USDT probe's rule starts with after `NAME=`.
const USDT_PREFIX: &str = "usdt:";

impl PhaseRule {
    /// `NAME=LIB:SYMBOL` as a key (a Python rule's matches are kept by it).
    pub fn name_and_site(&self) -> String {
        self.to_string()
    }

    /// A Python function's rule, as matched against the Python frames of stacks.
    pub fn python(&self) -> Option<PythonRule> {
        if self.lib != PYTHON_LIB {
            return None;
        }
        let (module, qualname) = self.symbol.split_once(':')?;
        let path = module.replace('.', "/");
        Some(PythonRule {
            name: self.name.clone(),
            rule: self.to_string(),
            files: [format!("{path}.py"), format!("{path}/__init__.py")],
            qualname: qualname.to_string(),
        })
    }
}

/// A Python function as a phase: a stack is in the phase when one of its Python frames is that
/// function (the innermost such frame's rule, when several match). Python phases are told from
/// stacks, not probes: they have no entry counts, and a free (which has no stack) is never in one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PythonRule {
    pub name: String,
    /// As given, `NAME=py:MODULE:QUALNAME`.
    pub rule: String,
    /// The module's file, relative: `pkg/mod.py` or `pkg/mod/__init__.py`.
    files: [String; 2],
    /// `Class.method` or `function`.
    qualname: String,
}

impl PythonRule {
    /// Whether a Python frame of `function` (its `co_qualname`, or `co_name` before 3.11) in
    /// `file` is this rule's function.
    pub fn matches(&self, function: &str, file: &str) -> bool {
        let in_module = self.files.iter().any(|f| {
            file == f
                || file
                    .strip_suffix(f.as_str())
                    .is_some_and(|dir| dir.ends_with('/'))
        });
        let last = self.qualname.rsplit('.').next().unwrap_or_default();
        in_module && (function == self.qualname || (!function.contains('.') && function == last))
    }
}

impl FromStr for PhaseRule {
    type Err = String;

    fn from_str(s: &str) -> Result<PhaseRule, String> {
        let shape = "expected NAME=LIB:SYMBOL, for example serve=libllama.so:llama_decode";
        let (name, site) = s.split_once('=').ok_or(shape)?;
        // A USDT rule's site is LIB:PROVIDER:PROBE after the prefix.
        let (site, usdt) = match site.strip_prefix(USDT_PREFIX) {
            Some(probe_site) => {
                let usdt_shape = "expected NAME=usdt:LIB:PROVIDER:PROBE, for example \
                                  serve=usdt:libserver.so:server:request__start";
                let mut parts = probe_site.split(':');
                let (Some(lib), Some(provider), Some(probe), None) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    return Err(usdt_shape.into());
                };
                if [lib, provider, probe]
                    .iter()
                    .any(|p| p.is_empty() || p.contains('['))
                {
                    return Err(usdt_shape.into());
                }
                (probe_site, true)
            }
            None => (site, false),
        };
        let (lib, symbol) = site.split_once(':').ok_or(shape)?;
        let (symbol, predicate) = phase_predicate::split(symbol)?;
        if name.is_empty() || lib.is_empty() || symbol.is_empty() {
            return Err(shape.into());
        }
        if predicate.is_some() && lib == PYTHON_LIB {
            return Err("a Python function's rule takes no condition".into());
        }
        if name.len() > NAME_MAX
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(format!(
                "phase name '{}': use at most {NAME_MAX} letters, digits, '-', '_' or '.'",
                printable(name)
            ));
        }
        if BUILT_IN.contains(&name) {
            return Err(format!(
                "phase name '{name}' is alloctrace's own: pick another"
            ));
        }
        if lib == PYTHON_LIB {
            let python = "expected NAME=py:MODULE:QUALNAME, for example \
                          serve=py:vllm.v1.worker.gpu_model_runner:GPUModelRunner.execute_model";
            let (module, qualname) = symbol.split_once(':').ok_or(python)?;
            let identifier = |s: &str| {
                !s.is_empty()
                    && s.split('.').all(|part| {
                        !part.is_empty()
                            && part
                                .chars()
                                .all(|c| c.is_alphanumeric() || "_<>".contains(c))
                    })
            };
            if !identifier(module) || !identifier(qualname) {
                return Err(python.into());
            }
        }
        Ok(PhaseRule {
            name: name.into(),
            lib: lib.into(),
            symbol: symbol.into(),
            predicate,
            usdt,
        })
    }
}

impl fmt::Display for PhaseRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let usdt = if self.usdt { USDT_PREFIX } else { "" };
        write!(f, "{}={usdt}{}:{}", self.name, self.lib, self.symbol)?;
        match &self.predicate {
            Some(p) => write!(f, "[{p}]"),
            None => Ok(()),
        }
    }
}

/// A rule whose function was found: where its probes go.
#[derive(Clone, Debug)]
pub struct ResolvedRule {
    /// The kernel's phase id (`tracer_common::phase`): the rule's position, from 1.
    pub id: u32,
    pub rule: PhaseRule,
    /// Where to open the file from here (the target may live in another mount namespace).
    pub open_path: PathBuf,
    /// The file as the target names it.
    pub shown_path: String,
    /// The function's file offset (a USDT probe's own offset).
    pub offset: u64,
    /// A USDT rule: the file offset of the function around the probe, whose entry ends the
    /// phase an earlier call set.
    pub around: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum PhaseError {
    #[error("--phase is given {0} times: {MAX_RULES} phase rules at most")]
    TooMany(usize),
    #[error("--phase {rule}: phase '{name}' has two rules: give each phase one function")]
    Twice { rule: String, name: String },
    #[error(
        "--phase {rule}: process {pid} maps no file named '{lib}': give the library's path (NAME=/path/to/lib.so:SYMBOL)"
    )]
    NotMapped { rule: String, pid: u32, lib: String },
    #[error("--phase {rule}: cannot read {path}: {why}")]
    Unreadable {
        rule: String,
        path: String,
        why: String,
    },
    #[error(
        "--phase {rule}: {path} has no function '{symbol}' in its symbol tables (C++ functions go by their mangled names; `nm -D` lists them)"
    )]
    NoSymbol {
        rule: String,
        path: String,
        symbol: String,
    },
    #[error("--phase {rule}: {path} declares no USDT probe {probe} (`readelf -n` lists them)")]
    NoProbe {
        rule: String,
        path: String,
        probe: String,
    },
    #[error("--phase {rule}: {why}")]
    UnusableProbe { rule: String, why: String },
}

/// The rules in effect: the user's, then the built-in profiles' (`hooks::PROFILES`): every
/// Python rule (it matches only its own module's frames), and every native rule, at the path of
/// its library where process `pid` maps it now (`maps`), else by its file name (resolved when a
/// traced process maps it). Each with the server of its profile.
pub fn with_profiles(
    user: &[PhaseRule],
    maps: &[Mapping],
) -> Vec<(PhaseRule, Option<&'static str>)> {
    let mut rules: Vec<(PhaseRule, Option<&'static str>)> =
        user.iter().map(|r| (r.clone(), None)).collect();
    for profile in PROFILES {
        for rule in profile.rules {
            let Some((lib, symbol)) = rule.site.split_once(':') else {
                continue;
            };
            let lib = if lib == PYTHON_LIB {
                lib.to_string()
            } else {
                let mapped = maps.iter().find(|m| !m.deleted && names_file(lib, &m.path));
                match mapped {
                    Some(m) => m.path.clone(),
                    None => lib.to_string(),
                }
            };
            let Ok((symbol, predicate)) = phase_predicate::split(symbol) else {
                continue;
            };
            let rule = PhaseRule {
                name: rule.phase.to_string(),
                lib,
                symbol: symbol.to_string(),
                predicate,
                usdt: false,
            };
            rules.push((rule, Some(profile.server)));
        }
    }
    rules
}

/// The user's rules (`--phase`): at most `MAX_RULES`, one a phase.
pub fn check_user_rules(rules: &[PhaseRule]) -> Result<(), PhaseError> {
    if rules.len() > MAX_RULES {
        return Err(PhaseError::TooMany(rules.len()));
    }
    for (i, rule) in rules.iter().enumerate() {
        if rules[..i].iter().any(|r| r.name == rule.name) {
            return Err(PhaseError::Twice {
                rule: printable(&rule.to_string()),
                name: rule.name.clone(),
            });
        }
    }
    Ok(())
}

/// A rule with the server of its profile (None: the user's).
pub type GivenRule = (PhaseRule, Option<&'static str>);

/// Native rules found, and those whose library no traced process maps yet.
#[derive(Debug, Default)]
pub struct Resolution {
    pub resolved: Vec<ResolvedRule>,
    /// Resolved when a traced process maps their file (`resolve_pending`).
    pub pending: Vec<GivenRule>,
}

/// Finds each native rule's function in the files process `pid` maps (`maps`), or at the path
/// given (Python rules need nothing found: they are matched in stacks). The native rules' kernel
/// ids count from 1 in the order found. A rule naming a file (not a path) that is not mapped yet
/// is pending: a library loaded later (dlopen, an engine process). A user's rule that is wrong
/// otherwise is an error; a profile's (with its server) is left out, and so is any rule past
/// `MAX_RULES` native ones.
pub fn resolve(rules: &[GivenRule], pid: u32, maps: &[Mapping]) -> Result<Resolution, PhaseError> {
    let mut found = Resolution::default();
    for given in rules.iter().filter(|(r, _)| r.python().is_none()) {
        match resolve_one(&given.0, pid, maps, found.resolved.len() as u32 + 1) {
            Ok(_) if found.resolved.len() == MAX_RULES => break,
            Ok(r) => found.resolved.push(r),
            Err(PhaseError::NotMapped { .. }) => found.pending.push(given.clone()),
            Err(e) if given.1.is_some() => log::debug!("phase profile rule left out: {e}"),
            Err(e) => return Err(e),
        }
    }
    Ok(found)
}

/// The pending rules whose file process `pid` maps now (`maps`), found and numbered after the
/// `known` rules (none past `MAX_RULES`); they leave `pending`. A rule found wrong there (no such
/// function) leaves it too, said on stderr.
pub fn resolve_pending(
    pending: &mut Vec<GivenRule>,
    known: usize,
    pid: u32,
    maps: &[Mapping],
) -> Vec<ResolvedRule> {
    let mut found: Vec<ResolvedRule> = Vec::new();
    pending.retain(|(rule, profile)| {
        if known + found.len() == MAX_RULES {
            return true;
        }
        match resolve_one(rule, pid, maps, (known + found.len()) as u32 + 1) {
            Ok(r) => {
                found.push(r);
                false
            }
            Err(PhaseError::NotMapped { .. }) => true,
            Err(e) => {
                match profile {
                    Some(_) => log::debug!("phase profile rule left out: {e}"),
                    None => eprintln!("alloctrace: {e}"),
                }
                false
            }
        }
    });
    found
}

/// Whether the mapped file `path` is the file named `lib`: as itself, or with a version after
/// it (`libllama.so` maps as `libllama.so.0`).
fn names_file(lib: &str, path: &str) -> bool {
    Path::new(path)
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n == lib || n.strip_prefix(lib).is_some_and(|v| v.starts_with('.')))
}

/// A native rule's function, as kernel phase `id`.
fn resolve_one(
    rule: &PhaseRule,
    pid: u32,
    maps: &[Mapping],
    id: u32,
) -> Result<ResolvedRule, PhaseError> {
    {
        let shown = printable(&rule.to_string());
        let (open_path, shown_path) = locate(rule, pid, maps).ok_or(PhaseError::NotMapped {
            rule: shown.clone(),
            pid,
            lib: printable(&rule.lib),
        })?;
        let unreadable = |why: String| PhaseError::Unreadable {
            rule: shown.clone(),
            path: printable(&shown_path),
            why,
        };
        let data = elf::read(&open_path).map_err(|e| unreadable(e.to_string()))?;
        let elf = Elf::parse(&open_path, &*data).map_err(|e| unreadable(e.to_string()))?;
        if rule.usdt {
            let (offset, around) = usdt_offset(rule, &elf, &shown, &shown_path)?;
            return Ok(ResolvedRule {
                id,
                rule: rule.clone(),
                open_path,
                shown_path,
                offset,
                around: Some(around),
            });
        }
        let offset = *elf
            .function_offsets(&[rule.symbol.as_str()])
            .get(rule.symbol.as_str())
            .ok_or_else(|| PhaseError::NoSymbol {
                rule: shown.clone(),
                path: printable(&shown_path),
                symbol: printable(&rule.symbol),
            })?;
        Ok(ResolvedRule {
            id,
            rule: rule.clone(),
            open_path,
            shown_path,
            offset,
            around: None,
        })
    }
}

/// Where USDT rule `rule`'s probe is in the file (`elf`): its file offset, and that of the
/// function around it. The probe must have
/// no semaphore (one with a semaphore fires only while a tracer counts itself in it, which
/// would write to the target) and sit in a function that keeps a frame pointer (`push rbp; mov
/// rbp, rsp`, after an `endbr64`): the return address the phase ends at is found through it.
fn usdt_offset<'d, R: object::ReadRef<'d>>(
    rule: &PhaseRule,
    elf: &Elf<'d, R>,
    shown: &str,
    shown_path: &str,
) -> Result<(u64, u64), PhaseError> {
    let unusable = |why: String| PhaseError::UnusableProbe {
        rule: shown.to_string(),
        why,
    };
    let (provider, name) = rule.symbol.split_once(':').unwrap_or_default();
    let probes = elf.usdt_probes();
    let mut sites = (probes.iter()).filter(|p| p.provider == provider && p.name == name);
    let probe = sites.next().ok_or_else(|| PhaseError::NoProbe {
        rule: shown.to_string(),
        path: printable(shown_path),
        probe: printable(&rule.symbol),
    })?;
    if sites.next().is_some() {
        return Err(unusable(format!(
            "{} has several sites of probe {}: give a function rule instead",
            printable(shown_path),
            printable(&rule.symbol)
        )));
    }
    if probe.semaphore != 0 {
        return Err(unusable(format!(
            "probe {} has a semaphore (it fires only while a tracer writes a count into the \
             target, which alloctrace does not do): give a function rule instead",
            printable(&rule.symbol)
        )));
    }
    let (function, start) = elf.function_at(probe.address).ok_or_else(|| {
        unusable(format!(
            "probe {} is in no function of the symbol table",
            printable(&rule.symbol)
        ))
    })?;
    let prologue = elf.data_at(start, 8).unwrap_or_default();
    let body = prologue
        .strip_prefix(&[0xf3, 0x0f, 0x1e, 0xfa])
        .unwrap_or(prologue);
    if !body.starts_with(&[0x55, 0x48, 0x89, 0xe5]) {
        return Err(unusable(format!(
            "probe {} is in {} which keeps no frame pointer: where it returns cannot be known \
             (build it with -fno-omit-frame-pointer, or give a function rule)",
            printable(&rule.symbol),
            printable(function)
        )));
    }
    let offsets = elf.file_offset(probe.address).zip(elf.file_offset(start));
    offsets.ok_or_else(|| {
        unusable(format!(
            "probe {} is outside the file's loaded segments",
            printable(&rule.symbol)
        ))
    })
}

/// The file a rule names: a path as given (mapped or not: a library loaded later), else the
/// mapped file with that file name. (where to open it, its name).
fn locate(rule: &PhaseRule, pid: u32, maps: &[Mapping]) -> Option<(PathBuf, String)> {
    if rule.lib.contains('/') {
        let mapped = maps.iter().find(|m| m.path == rule.lib);
        return Some(match mapped {
            Some(m) => (maps::open_path(pid, m), m.path.clone()),
            None => (PathBuf::from(&rule.lib), rule.lib.clone()),
        });
    }
    let m = maps
        .iter()
        .filter(|m| !m.deleted && m.path.starts_with('/'))
        .find(|m| names_file(&rule.lib, &m.path))?;
    Some((maps::open_path(pid, m), m.path.clone()))
}

/// The name of each kernel phase id: index 0 is none, then the rules in order, and idle at
/// `phase::IDLE` (ids no rule has are none).
pub fn names(rules: &[ResolvedRule]) -> Vec<String> {
    let mut names = vec![PHASE_NONE.to_string(); phase::IDS];
    for (name, rule) in names[1..].iter_mut().zip(rules) {
        name.clone_from(&rule.rule.name);
    }
    names[phase::IDLE as usize] = PHASE_IDLE.to_string();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_is_a_name_a_file_and_a_function() {
        let rule: PhaseRule = "serve=libllama.so:llama_decode".parse().unwrap();
        assert_eq!(
            rule,
            PhaseRule {
                name: "serve".into(),
                lib: "libllama.so".into(),
                symbol: "llama_decode".into(),
                predicate: None,
                usdt: false,
            }
        );
        // The first ':' ends the file: a C++ symbol keeps its own.
        let rule: PhaseRule = "decode=/opt/a.so:_ZN13llama_context6decodeER11llama_batch"
            .parse()
            .unwrap();
        assert_eq!(rule.lib, "/opt/a.so");
        assert_eq!(rule.symbol, "_ZN13llama_context6decodeER11llama_batch");
        // A condition on the call, after the symbol.
        let rule: PhaseRule = "prefill=libllama.so:llama_decode[sp+8:i32>1]"
            .parse()
            .unwrap();
        assert_eq!(rule.symbol, "llama_decode");
        assert_eq!(rule.predicate.unwrap().to_string(), "sp+8:i32>1");
        assert_eq!(
            rule.to_string(),
            "prefill=libllama.so:llama_decode[sp+8:i32>1]"
        );
        assert!("p=py:m:f[arg1>1]".parse::<PhaseRule>().is_err());
        // A USDT probe.
        let rule: PhaseRule = "serve=usdt:libserver.so:server:request__start"
            .parse()
            .unwrap();
        assert!(rule.usdt && rule.python().is_none());
        assert_eq!(
            (rule.lib.as_str(), rule.symbol.as_str()),
            ("libserver.so", "server:request__start")
        );
        assert_eq!(
            rule.to_string(),
            "serve=usdt:libserver.so:server:request__start"
        );
        for bad in [
            "s=usdt:lib.so:p",
            "s=usdt:lib.so:p:n:x",
            "s=usdt::p:n",
            "s=usdt:l:p:n[arg1>1]",
        ] {
            assert!(bad.parse::<PhaseRule>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bad_rule_says_what_is_wrong() {
        for (bad, says) in [
            ("serve", "expected NAME=LIB:SYMBOL"),
            ("serve=libllama.so", "expected NAME=LIB:SYMBOL"),
            ("=lib:f", "expected NAME=LIB:SYMBOL"),
            ("serve=lib:", "expected NAME=LIB:SYMBOL"),
            ("a b=lib:f", "letters, digits"),
            ("none=lib:f", "alloctrace's own"),
            ("graph-capture=lib:f", "alloctrace's own"),
            ("serve=py:server", "NAME=py:MODULE:QUALNAME"),
            ("serve=py:server.:handle", "NAME=py:MODULE:QUALNAME"),
            ("serve=py:server:a b", "NAME=py:MODULE:QUALNAME"),
        ] {
            let err = bad.parse::<PhaseRule>().unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
        let long = format!("{}=lib:f", "x".repeat(33));
        assert!(long.parse::<PhaseRule>().is_err());
    }

    #[test]
    fn a_rule_finds_its_function_in_a_mapped_file_by_name() {
        let exe = std::env::current_exe().unwrap();
        let me = std::process::id();
        let maps = maps::read_maps(me).unwrap();
        let libc = maps
            .iter()
            .find(|m| crate::probes::resolve::is_libc_name(&m.path))
            .expect("this test maps a C library");
        let libc_name = Path::new(&libc.path).file_name().unwrap().to_str().unwrap();
        let rules: Vec<(PhaseRule, Option<&str>)> = [
            format!("alloc={libc_name}:malloc"),
            format!("release={}:free", libc.path),
        ]
        .iter()
        .map(|r| (r.parse().unwrap(), None))
        .collect();
        let resolved = resolve(&rules, me, &maps).unwrap().resolved;
        assert_eq!(resolved.len(), 2);
        assert_eq!((resolved[0].id, resolved[1].id), (1, 2));
        assert_eq!(resolved[0].shown_path, libc.path);
        assert!(resolved.iter().all(|r| r.offset > 0));
        assert_ne!(resolved[0].offset, resolved[1].offset);
        let names = names(&resolved);
        assert_eq!(names[..4], ["none", "alloc", "release", "none"]);
        assert_eq!(names[phase::IDLE as usize], "idle");
        assert_eq!(names.len(), phase::IDS);

        let err = |rule: &str| {
            resolve(&[(rule.parse().unwrap(), None)], me, &maps)
                .unwrap_err()
                .to_string()
        };
        assert!(err(&format!("x={libc_name}:no_such_function")).contains("has no function"));
        let exe = exe.display();
        assert!(err(&format!("x={exe}.missing:f")).contains("cannot read"));

        // A file no process maps yet: pending, found once a process maps it (here, the C
        // library by its file name without its version: `libc.so` names `libc.so.6`).
        let later: Vec<GivenRule> = ["x=no_such_lib.so:f", "y=libc.so:free"]
            .iter()
            .map(|r| (r.parse().unwrap(), None))
            .collect();
        let mut pending = resolve(&later, me, &[]).unwrap().pending;
        assert_eq!(pending.len(), 2);
        let found = resolve_pending(&mut pending, 3, me, &maps);
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].id, found[0].rule.name.as_str()), (4, "y"));
        assert_eq!(found[0].shown_path, libc.path);
        assert_eq!(pending, [later[0].clone()]);
        // No more than MAX_RULES in all.
        let mut pending = later[1..].to_vec();
        assert!(resolve_pending(&mut pending, MAX_RULES, me, &maps).is_empty());
        assert_eq!(pending.len(), 1);
        let twice: Vec<PhaseRule> = ["a=x:f", "a=y:g"]
            .iter()
            .map(|r| r.parse().unwrap())
            .collect();
        assert!(
            check_user_rules(&twice)
                .unwrap_err()
                .to_string()
                .contains("two rules")
        );
    }
}

#[cfg(test)]
mod python_tests {
    use super::*;

    #[test]
    fn a_python_rule_matches_its_function_in_its_module_file() {
        let rule: PhaseRule =
            "serve=py:vllm.v1.worker.gpu_model_runner:GPUModelRunner.execute_model"
                .parse()
                .unwrap();
        let py = rule.python().expect("a Python rule");
        let file = "/usr/lib/python3/site-packages/vllm/v1/worker/gpu_model_runner.py";
        assert!(py.matches("GPUModelRunner.execute_model", file));
        // Before 3.11 a frame has the bare name.
        assert!(py.matches("execute_model", file));
        assert!(py.matches(
            "GPUModelRunner.execute_model",
            "vllm/v1/worker/gpu_model_runner.py"
        ));
        assert!(!py.matches("Other.execute_model", file));
        assert!(!py.matches(
            "GPUModelRunner.execute_model",
            "/x/myvllm/v1/worker/gpu_model_runner.py"
        ));
        assert!(!py.matches(
            "GPUModelRunner.execute_model",
            "/x/vllm/v1/worker/gpu_worker.py"
        ));
        let package: PhaseRule = "load=py:server:main".parse().unwrap();
        assert!(
            package
                .python()
                .unwrap()
                .matches("main", "/srv/app/server/__init__.py")
        );
        let native: PhaseRule = "serve=libllama.so:llama_decode".parse().unwrap();
        assert_eq!(native.python(), None);
    }

    /// The profiles' Python rules are all in effect after the user's; their native rules at
    /// their library's path where it is mapped, else by its file name (pending).
    #[test]
    fn profiles_add_their_python_rules_and_the_native_ones_of_mapped_libraries() {
        let user: PhaseRule = "serve=py:server:handle".parse().unwrap();
        let none = with_profiles(std::slice::from_ref(&user), &[]);
        assert_eq!(none[0], (user.clone(), None));
        assert!(
            none[1..]
                .iter()
                .all(|(r, p)| p.is_some() && (r.python().is_some() || r.lib == "libllama.so"))
        );
        assert!(none.iter().any(|(r, p)| r.to_string()
            == "serve=py:vllm.v1.worker.gpu_model_runner:GPUModelRunner.execute_model"
            && *p == Some("vLLM")));
        let maps = maps::parse_maps(
            "7f0000000000-7f0000100000 r-xp 00000000 08:01 42 /opt/llama/libllama.so.0.0.1\n",
        );
        let with = with_profiles(&[], &maps);
        let native: Vec<String> = (with.iter())
            .filter(|(r, _)| r.python().is_none())
            .map(|(r, _)| r.to_string())
            .collect();
        assert_eq!(
            native,
            [
                "load=/opt/llama/libllama.so.0.0.1:llama_model_load_from_file",
                "kv-cache=/opt/llama/libllama.so.0.0.1:llama_init_from_model",
                "prefill=/opt/llama/libllama.so.0.0.1:llama_decode[sp+8:i32>1]",
                "decode=/opt/llama/libllama.so.0.0.1:llama_decode[sp+8:i32<=1]",
                "serve=/opt/llama/libllama.so.0.0.1:llama_encode",
            ]
        );
        // A profile's rule whose function is not there is left out, not an error.
        let missing = resolve(&with, std::process::id(), &maps).unwrap();
        assert!(missing.resolved.is_empty() && missing.pending.is_empty());
        // Without the library: by its file name, pending.
        let later = with_profiles(&[], &[]);
        let native: Vec<String> = (later.iter())
            .filter(|(r, _)| r.python().is_none())
            .map(|(r, _)| r.to_string())
            .collect();
        assert_eq!(native[0], "load=libllama.so:llama_model_load_from_file");
        let pending = resolve(&later, std::process::id(), &[]).unwrap().pending;
        assert_eq!(pending.len(), native.len());
    }

    #[test]
    fn python_rules_take_no_kernel_id() {
        let rules: Vec<PhaseRule> = ["load=py:server:load", "serve=py:server:serve"]
            .iter()
            .map(|r| r.parse().unwrap())
            .collect();
        let given: Vec<(PhaseRule, Option<&str>)> = rules.into_iter().map(|r| (r, None)).collect();
        let resolved = resolve(&given, std::process::id(), &[]).unwrap().resolved;
        assert!(resolved.is_empty());
        assert!(
            names(&resolved)[..phase::IDLE as usize]
                .iter()
                .all(|n| n == "none")
        );
    }
}
