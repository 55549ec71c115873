//! Resolving a model id to a directory: a local path, or a snapshot in the Hugging Face cache.
//!
//! Cache layout (as `huggingface_hub` writes it):
//! `$HF_HUB_CACHE` or `$HF_HOME/hub` or `~/.cache/huggingface/hub`, then
//! `models--{org}--{name}/refs/{revision}` (a commit hash) and `models--{org}--{name}/snapshots/{hash}/...`.
//! Downloading is not done here: the Python layer calls `huggingface_hub` when this says `NotCached`.

use std::path::{Path, PathBuf};

use crate::error::CheckpointError;

/// The Hugging Face hub cache directory.
#[derive(Debug, Clone)]
pub struct HubCache {
    pub root: PathBuf,
}

impl HubCache {
    /// The cache named by the environment, like `huggingface_hub.constants.HF_HUB_CACHE`.
    pub fn from_env() -> Self {
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let root = env("HF_HUB_CACHE")
            .or_else(|| env("HUGGINGFACE_HUB_CACHE"))
            .or_else(|| env("HF_HOME").map(|h| h.join("hub")))
            .or_else(|| env("XDG_CACHE_HOME").map(|x| x.join("huggingface").join("hub")))
            .unwrap_or_else(|| env("HOME").unwrap_or_else(|| PathBuf::from(".")).join(".cache/huggingface/hub"));
        HubCache { root }
    }

    /// `models--org--name` folder of a repo id.
    pub fn repo_folder(&self, repo_id: &str) -> PathBuf {
        self.root.join(format!("models--{}", repo_id.replace('/', "--")))
    }

    /// The snapshot directory of `repo_id` at `revision` (a branch, tag or commit hash), if cached
    /// and holding `marker` (e.g. `config.json`).
    pub fn snapshot(&self, repo_id: &str, revision: &str, marker: &str) -> Option<PathBuf> {
        let repo = self.repo_folder(repo_id);
        let refs = repo.join("refs").join(revision);
        let commit = match std::fs::read_to_string(&refs) {
            Ok(hash) => hash.trim().to_string(),
            Err(_) => revision.to_string(), // maybe already a commit hash
        };
        let snap = repo.join("snapshots").join(commit);
        snap.join(marker).is_file().then_some(snap)
    }
}

/// True when `s` looks like a hub id (`name` or `org/name`), not a filesystem path.
fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    !s.is_empty()
        && parts.len() <= 2
        && parts.iter().all(|p| !p.is_empty() && *p != "." && *p != "..")
        && !s.starts_with('~')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

/// Resolves a local directory or a cached hub id whose folder holds `marker` (`config.json` for a
/// model, `tokenizer_config.json` for a tokenizer, ...). `NotFound` for a path that is not such a
/// dir, `NotCached` for a hub id missing from the cache (the caller may then download it).
pub fn resolve_dir(
    id_or_path: &str,
    revision: Option<&str>,
    cache: &HubCache,
    marker: &str,
) -> Result<PathBuf, CheckpointError> {
    let p = Path::new(id_or_path);
    if p.is_dir() {
        if !p.join(marker).is_file() {
            return Err(CheckpointError::NotFound { path: p.join(marker), hint: String::new() });
        }
        return Ok(p.to_path_buf());
    }
    if p.exists() {
        return Err(CheckpointError::NotFound {
            path: p.to_path_buf(),
            hint: " (expected a directory or a hub id)".into(),
        });
    }
    if looks_like_repo_id(id_or_path) {
        if let Some(snap) = cache.snapshot(id_or_path, revision.unwrap_or("main"), marker) {
            return Ok(snap);
        }
        return Err(CheckpointError::NotCached { id: id_or_path.to_string(), cache: cache.repo_folder(id_or_path) });
    }
    Err(CheckpointError::NotFound { path: p.to_path_buf(), hint: " (no such directory, and not a hub id)".into() })
}

/// [`resolve_dir`] for a model checkpoint (`config.json`).
pub fn resolve_model_dir(
    id_or_path: &str,
    revision: Option<&str>,
    cache: &HubCache,
) -> Result<PathBuf, CheckpointError> {
    resolve_dir(id_or_path, revision, cache, "config.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_snapshot_through_refs() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = HubCache { root: tmp.path().to_path_buf() };
        let repo = cache.repo_folder("org/model");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        let snap = repo.join("snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        assert_eq!(resolve_model_dir("org/model", None, &cache).unwrap(), snap);
        assert_eq!(resolve_model_dir("org/model", Some("abc123"), &cache).unwrap(), snap);
        let e = resolve_model_dir("org/other", None, &cache).unwrap_err().to_string();
        assert!(e.contains("org/other") && e.contains("models--org--other"), "{e}");
        let e = resolve_model_dir("/no/such/dir/x", None, &cache).unwrap_err().to_string();
        assert!(e.contains("/no/such/dir/x"), "{e}");
    }
}
