//! kubelet's side of projected ServiceAccount tokens: a token volume written the way kubelet's
//! `AtomicWriter` writes one (a timestamped data directory, a `..data` symlink swapped by
//! rename, and `token` → `..data/token`), so a reader that opens [`ProjectedTokenFile::path`]
//! sees the old token or the new one across a rotation, never a torn or missing file.

use std::io;
use std::os::unix::fs::{PermissionsExt as _, symlink};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::kube_api::KubeApi;

/// The file name of the token in the volume, as a pod spec's `serviceAccountToken.path`
/// usually says.
pub const TOKEN_FILE: &str = "token";

/// The symlink that names the current data directory.
const DATA_DIR: &str = "..data";

/// Where the next `..data` symlink is made before it is renamed over the current one.
const NEW_DATA_DIR: &str = "..data_tmp";

/// Mode of the token file: the projected volume's default (`defaultMode` 0644).
const TOKEN_FILE_MODE: u32 = 0o644;

/// Mode kubelet gives a data directory.
const DATA_DIR_MODE: u32 = 0o755;

/// Makes data directory names unique within a process even within one clock tick.
static WRITES: AtomicU64 = AtomicU64::new(0);

/// A projected token volume: the directory kubelet mounts into the pod.
#[derive(Debug, Clone)]
pub struct ProjectedTokenFile {
    dir: PathBuf,
}

/// What kubelet projects for one pod: the `serviceAccountToken` source of its volume and the
/// pod it is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenProjection {
    /// Namespace of the pod.
    pub namespace: String,
    /// The ServiceAccount the pod runs as.
    pub service_account: String,
    /// Name of the pod the token is bound to.
    pub pod_name: String,
    /// Uid of that pod.
    pub pod_uid: String,
    /// `serviceAccountToken.audience`.
    pub audience: String,
    /// `serviceAccountToken.expirationSeconds`.
    pub expiration_seconds: i64,
}

impl ProjectedTokenFile {
    /// A volume in `dir` (created if missing); nothing is written until [`Self::write`].
    pub fn new(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// The volume's directory (the pod's mount point).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The token path an SDK reads (`AWS_WEB_IDENTITY_TOKEN_FILE` and the like).
    pub fn path(&self) -> PathBuf {
        self.dir.join(TOKEN_FILE)
    }

    /// Writes `token` as kubelet does; writing again is a rotation.
    ///
    /// One thing differs: kubelet removes the previous data directory at once, so a reader
    /// that resolved `..data` just before the swap can find no token (ENOENT). Rotations
    /// minutes apart never meet that; a test rotating in a loop would, so the previous
    /// directory is kept until the next write.
    pub fn write(&self, token: &str) -> io::Result<()> {
        let previous = std::fs::read_link(self.dir.join(DATA_DIR)).ok();
        let fresh = self.new_data_dir()?;
        write_token(&self.dir.join(&fresh).join(TOKEN_FILE), token)?;
        self.point_data_at(&fresh)?;
        self.link_user_visible_file()?;
        self.remove_data_dirs_but(&[Some(fresh), previous])
    }

    /// kubelet's refresh: requests a token for `projection` from the API server (the
    /// TokenRequest API, see [`KubeApi::issue_token`]) and writes it. Answers the token.
    pub async fn refresh(
        &self,
        api: &KubeApi,
        projection: &TokenProjection,
    ) -> anyhow::Result<String> {
        let token = api
            .issue_token(
                &projection.namespace,
                &projection.service_account,
                &projection.pod_name,
                &projection.pod_uid,
                &projection.audience,
                projection.expiration_seconds,
            )
            .await?;
        self.write(&token)?;
        Ok(token)
    }

    /// A new, empty data directory named like kubelet's (`..2006_01_02_15_04_05.<unique>`),
    /// relative to the volume.
    fn new_data_dir(&self) -> io::Result<PathBuf> {
        let now = time::OffsetDateTime::now_utc();
        let stamp = format!(
            "..{:04}_{:02}_{:02}_{:02}_{:02}_{:02}.",
            now.year(),
            u8::from(now.month()),
            now.day(),
            now.hour(),
            now.minute(),
            now.second()
        );
        loop {
            let unique = WRITES.fetch_add(1, Ordering::Relaxed);
            let name = PathBuf::from(format!("{stamp}{}{unique}", std::process::id()));
            match std::fs::create_dir(self.dir.join(&name)) {
                Ok(()) => {
                    let permissions = std::fs::Permissions::from_mode(DATA_DIR_MODE);
                    std::fs::set_permissions(self.dir.join(&name), permissions)?;
                    return Ok(name);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// `..data` → `fresh`, atomically: a new symlink renamed over the old one.
    fn point_data_at(&self, fresh: &Path) -> io::Result<()> {
        let staged = self.dir.join(NEW_DATA_DIR);
        match std::fs::remove_file(&staged) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        symlink(fresh, &staged)?;
        std::fs::rename(&staged, self.dir.join(DATA_DIR))
    }

    /// Removes every timestamped data directory not in `keep`.
    fn remove_data_dirs_but(&self, keep: &[Option<PathBuf>]) -> io::Result<()> {
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = PathBuf::from(entry.file_name());
            let timestamped = name.to_string_lossy().starts_with("..")
                && name != Path::new(DATA_DIR)
                && name != Path::new(NEW_DATA_DIR)
                && entry.file_type()?.is_dir();
            if timestamped && !keep.iter().flatten().any(|k| *k == name) {
                std::fs::remove_dir_all(entry.path())?;
            }
        }
        Ok(())
    }

    /// `token` → `..data/token`, made once: later writes only move `..data`.
    fn link_user_visible_file(&self) -> io::Result<()> {
        let visible = self.path();
        if std::fs::symlink_metadata(&visible).is_ok() {
            return Ok(());
        }
        symlink(Path::new(DATA_DIR).join(TOKEN_FILE), visible)
    }
}

fn write_token(path: &Path, token: &str) -> io::Result<()> {
    std::fs::write(path, token)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(TOKEN_FILE_MODE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    fn data_dirs(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("..2"))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn the_volume_is_laid_out_as_kubelet_lays_it_out() {
        let temp = tempfile::tempdir().unwrap();
        let file = ProjectedTokenFile::new(temp.path().join("tokens")).unwrap();

        file.write("first").unwrap();

        assert_eq!(std::fs::read_to_string(file.path()).unwrap(), "first");
        let visible = std::fs::read_link(file.path()).unwrap();
        assert_eq!(visible, Path::new("..data/token"));
        let data = std::fs::read_link(file.dir().join("..data")).unwrap();
        assert_eq!(data_dirs(file.dir()), [data.to_string_lossy().into_owned()]);
        assert!(!file.dir().join("..data_tmp").exists());
        let mode = std::fs::metadata(file.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
    }

    #[test]
    fn a_rewrite_swaps_the_data_directory_and_keeps_only_the_previous_one() {
        let temp = tempfile::tempdir().unwrap();
        let file = ProjectedTokenFile::new(temp.path()).unwrap();
        let data = || {
            std::fs::read_link(file.dir().join("..data"))
                .unwrap()
                .to_string_lossy()
                .into_owned()
        };
        file.write("first").unwrap();
        let first = data();

        file.write("second").unwrap();
        let second = data();
        assert_ne!(first, second);
        assert_eq!(std::fs::read_to_string(file.path()).unwrap(), "second");
        let mut both = vec![first, second.clone()];
        both.sort();
        assert_eq!(data_dirs(file.dir()), both);

        file.write("third").unwrap();
        let mut kept = vec![second, data()];
        kept.sort();
        assert_eq!(data_dirs(file.dir()), kept);
        assert_eq!(std::fs::read_to_string(file.path()).unwrap(), "third");
    }

    #[test]
    fn a_reader_sees_the_old_token_or_the_new_one_never_anything_else() {
        // GIVEN a reader that keeps opening the token path, as an SDK re-reading it
        let temp = tempfile::tempdir().unwrap();
        let file = ProjectedTokenFile::new(temp.path()).unwrap();
        let tokens = ["a".repeat(900), "b".repeat(1200)];
        file.write(&tokens[0]).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let reader = {
            let (path, done, tokens) = (file.path(), done.clone(), tokens.clone());
            std::thread::spawn(move || {
                let mut reads = 0_u32;
                while !done.load(Ordering::SeqCst) || reads == 0 {
                    let read = std::fs::read_to_string(&path).expect("the token is always there");
                    assert!(tokens.contains(&read), "a torn token: {} bytes", read.len());
                    reads += 1;
                }
                reads
            })
        };

        // WHEN kubelet rotates it many times (a breath apart, as a loaded machine could stall
        // the reader mid-open across two back-to-back writes)
        for round in 0..200 {
            file.write(&tokens[round % 2]).unwrap();
            std::thread::sleep(std::time::Duration::from_micros(500));
        }
        done.store(true, Ordering::SeqCst);

        // THEN every read was one whole token
        assert!(reader.join().unwrap() > 0);
        assert_eq!(data_dirs(file.dir()).len(), 2);
    }

    #[tokio::test]
    async fn refresh_writes_a_token_bound_to_the_pod() {
        use base64::Engine as _;
        let api = KubeApi::start().await.unwrap();
        api.put_service_account("team-a", "app", &[]);
        let temp = tempfile::tempdir().unwrap();
        let file = ProjectedTokenFile::new(temp.path()).unwrap();
        let projection = TokenProjection {
            namespace: "team-a".to_owned(),
            service_account: "app".to_owned(),
            pod_name: "web-1".to_owned(),
            pod_uid: "6f1c3c8e-0000-4000-8000-000000000001".to_owned(),
            audience: "iam-broker".to_owned(),
            expiration_seconds: 3600,
        };

        let first = file.refresh(&api, &projection).await.unwrap();
        let second = file.refresh(&api, &projection).await.unwrap();

        assert_ne!(first, second, "each refresh is a new token");
        assert_eq!(std::fs::read_to_string(file.path()).unwrap(), second);
        let payload = second.split('.').nth(1).unwrap();
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(claims["aud"], serde_json::json!(["iam-broker"]));
        assert_eq!(
            claims["kubernetes.io"]["pod"],
            serde_json::json!({ "name": "web-1", "uid": projection.pod_uid })
        );
    }
}
