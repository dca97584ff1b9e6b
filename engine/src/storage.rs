//! Layer roots: an object_store URL (or a local folder) turned into a store
//! and the prefix under which `raw/`, `curated/` and `metadata/` live.
//!
//! Reading goes through here too: [`Root::open_sync`] gives a blocking
//! `Read` over an object (a plain file for local roots, a streamed body for
//! remote ones) so the CPU-bound line scanning runs on blocking threads.

use std::io::Read;
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{GetResultPayload, ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload};
use url::Url;

use crate::error::{Error, Result};
use crate::layout::Paths;
use crate::settings::{S3Settings, Settings};

/// One layer root.
#[derive(Debug, Clone)]
pub struct Root {
    pub store: Arc<dyn ObjectStore>,
    /// The URL of the store itself (scheme and authority), for DataFusion.
    pub store_url: Url,
    pub paths: Paths,
    /// The store again when it is a local folder, whose files the blocking
    /// writers write directly ([`Root::create_sync`]).
    local: Option<Arc<LocalFileSystem>>,
}

/// The three layer roots of a lake.
#[derive(Debug, Clone)]
pub struct Lake {
    pub raw: Root,
    pub curated: Root,
    pub metadata: Root,
}

impl Lake {
    /// Opens the roots named by `settings`. Roots that name the same URL share
    /// one store (so `memory://` is one lake, not three).
    pub fn open(settings: &Settings) -> Result<Lake> {
        let main = Root::open(&settings.lake, &settings.s3)?;
        let other = |v: &Option<String>| match v {
            Some(url) if url != &settings.lake => Root::open(url, &settings.s3),
            _ => Ok(main.clone()),
        };
        Ok(Lake {
            raw: other(&settings.raw_root)?,
            curated: other(&settings.curated_root)?,
            metadata: other(&settings.metadata_root)?,
        })
    }
}

/// The bytes of one object named by URL (`s3://bucket/key`, `file:///…`),
/// or of a local file.
pub async fn read_url(location: &str, s3: &S3Settings) -> Result<Vec<u8>> {
    if !location.contains("://") {
        return std::fs::read(location).map_err(|e| Error::Config(format!("{location}: {e}")));
    }
    let (dir, name) = location
        .rsplit_once('/')
        .filter(|(d, n)| !n.is_empty() && d.contains("://"))
        .ok_or_else(|| Error::Config(format!("{location:?} is not a file's URL")))?;
    let root = Root::open(dir, s3)?;
    let path = root.paths.file(name);
    Ok(root
        .get_bytes("settings", &path)
        .await?
        .ok_or_else(|| Error::Config(format!("no file at {location}")))?
        .to_vec())
}

impl Root {
    /// `location` is a URL or a local folder (created when missing).
    pub fn open(location: &str, s3: &S3Settings) -> Result<Root> {
        let bad = |reason: String| Error::Config(format!("lake root {location:?}: {reason}"));
        let url = if location.contains("://") {
            Url::parse(location).map_err(|e| bad(e.to_string()))?
        } else {
            std::fs::create_dir_all(location).map_err(|e| bad(e.to_string()))?;
            let abs = std::fs::canonicalize(location).map_err(|e| bad(e.to_string()))?;
            Url::from_directory_path(&abs).map_err(|_| bad("not an absolute folder".into()))?
        };
        let mut local = None;
        let (store, store_url, prefix): (Arc<dyn ObjectStore>, Url, Path) = match url.scheme() {
            "file" => {
                let dir = url
                    .to_file_path()
                    .map_err(|_| bad("not a local path".into()))?;
                std::fs::create_dir_all(&dir).map_err(|e| bad(e.to_string()))?;
                let prefix = Path::from_filesystem_path(&dir).map_err(|e| bad(e.to_string()))?;
                let store = Arc::new(LocalFileSystem::new());
                local = Some(store.clone());
                (store, Url::parse("file:///").unwrap(), prefix)
            }
            "memory" => (
                Arc::new(InMemory::new()),
                Url::parse("memory:///").unwrap(),
                Path::from(url.path().trim_matches('/')),
            ),
            "s3" => {
                let bucket = url.host_str().ok_or_else(|| bad("no bucket".into()))?;
                let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
                if let Some(e) = &s3.endpoint {
                    // S3-compatible stores (and moto in tests) want path-style URLs.
                    b = b.with_endpoint(e).with_virtual_hosted_style_request(false);
                }
                if let Some(r) = &s3.region {
                    b = b.with_region(r);
                }
                if s3.allow_http {
                    b = b.with_allow_http(true);
                }
                if let (Some(k), Some(s)) = (&s3.access_key_id, &s3.secret_access_key) {
                    b = b.with_access_key_id(k).with_secret_access_key(s);
                }
                if let Some(t) = &s3.session_token {
                    b = b.with_token(t);
                }
                let store = b.build().map_err(|e| bad(e.to_string()))?;
                (
                    Arc::new(store),
                    Url::parse(&format!("s3://{bucket}/")).unwrap(),
                    Path::from(url.path().trim_matches('/')),
                )
            }
            other => return Err(bad(format!("unsupported scheme {other:?}"))),
        };
        Ok(Root {
            store,
            store_url,
            paths: Paths::new(prefix),
            local,
        })
    }

    /// The full URL of an object, for messages and metadata rows.
    pub fn url_of(&self, path: &Path) -> String {
        format!("{}{}", self.store_url, path)
    }

    /// Every object below `prefix`, sorted by path.
    pub async fn list(&self, stage: &'static str, prefix: &Path) -> Result<Vec<ObjectMeta>> {
        let mut all: Vec<ObjectMeta> = self
            .store
            .list(Some(prefix))
            .try_collect()
            .await
            .map_err(|e| Error::store(stage, self.url_of(prefix), e))?;
        all.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(all)
    }

    /// The folders directly below `prefix` (one delimiter listing), sorted.
    pub async fn list_dirs(&self, stage: &'static str, prefix: &Path) -> Result<Vec<Path>> {
        let mut dirs = self
            .store
            .list_with_delimiter(Some(prefix))
            .await
            .map_err(|e| Error::store(stage, self.url_of(prefix), e))?
            .common_prefixes;
        dirs.sort();
        Ok(dirs)
    }

    pub async fn put(&self, stage: &'static str, path: &Path, bytes: Vec<u8>) -> Result<()> {
        self.store
            .put(path, PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| Error::store(stage, self.url_of(path), e))
    }

    /// Creates `path` only if no object is there (S3 `If-None-Match: *`, a
    /// hard link on a local disk): `false` when one already is. The building
    /// block of every name that two runs might both want (commit sequence
    /// numbers, lease generations, raw part numbers).
    pub async fn create(&self, stage: &'static str, path: &Path, bytes: Vec<u8>) -> Result<bool> {
        let opts = object_store::PutOptions {
            mode: object_store::PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(path, PutPayload::from(bytes), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(Error::store(stage, self.url_of(path), e)),
        }
    }

    pub async fn get_bytes(
        &self,
        stage: &'static str,
        path: &Path,
    ) -> Result<Option<bytes::Bytes>> {
        match self.store.get(path).await {
            Ok(r) => Ok(Some(
                r.bytes()
                    .await
                    .map_err(|e| Error::store(stage, self.url_of(path), e))?,
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::store(stage, self.url_of(path), e)),
        }
    }

    /// Deletes `path`; a missing object is not an error.
    pub async fn delete(&self, stage: &'static str, path: &Path) -> Result<()> {
        match self.store.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::store(stage, self.url_of(path), e)),
        }
    }

    /// A blocking reader over an object, checked against `expect` (size and
    /// e-tag) so that a file replaced between two reads is noticed. Call from
    /// a blocking thread.
    pub fn open_sync(
        &self,
        stage: &'static str,
        meta: &ObjectMeta,
    ) -> Result<Box<dyn Read + Send>> {
        let handle = tokio::runtime::Handle::current();
        let result = self.get_checked(stage, meta, None)?;
        Ok(match result.payload {
            // Local files: read the file directly, no async round trips.
            GetResultPayload::File(file, _) => Box::new(file),
            GetResultPayload::Stream(stream) => {
                let stream = stream.map_err(std::io::Error::other);
                let reader = tokio_util::io::StreamReader::new(stream);
                Box::new(tokio_util::io::SyncIoBridge::new_with_handle(
                    reader, handle,
                ))
            }
        })
    }
}
impl Root {
    /// GET of `meta`'s object (or of `range` of it), checked against `meta`:
    /// the e-tag when the caller had one (a listing), and the size (a
    /// commit record gives the size; its checksum is checked by importers).
    /// Blocking: call from a blocking thread.
    fn get_checked(
        &self,
        stage: &'static str,
        meta: &ObjectMeta,
        range: Option<object_store::GetRange>,
    ) -> Result<object_store::GetResult> {
        let handle = tokio::runtime::Handle::current();
        let path = &meta.location;
        let options = object_store::GetOptions {
            range,
            ..Default::default()
        };
        let result = handle
            .block_on(self.store.get_opts(path, options))
            .map_err(|e| Error::store(stage, self.url_of(path), e))?;
        let etag_differs = meta.e_tag.is_some() && result.meta.e_tag != meta.e_tag;
        if result.meta.size != meta.size || etag_differs {
            return Err(Error::InputChanged {
                stage,
                location: self.url_of(path),
                detail: format!("size {} became {}", meta.size, result.meta.size),
            });
        }
        Ok(result)
    }

    /// The bytes `range` of `meta`'s object, checked as [`Root::open_sync`]
    /// checks a whole object. Blocking.
    pub fn read_range_sync(
        &self,
        stage: &'static str,
        meta: &ObjectMeta,
        range: std::ops::Range<u64>,
    ) -> Result<bytes::Bytes> {
        let handle = tokio::runtime::Handle::current();
        let result = self.get_checked(stage, meta, Some(range.into()))?;
        handle
            .block_on(result.bytes())
            .map_err(|e| Error::store(stage, self.url_of(&meta.location), e))
    }

    /// `meta`'s file, checked as [`Root::open_sync`] checks it, when this
    /// root is a local folder; None for other stores. Blocking.
    pub fn open_local(
        &self,
        stage: &'static str,
        meta: &ObjectMeta,
    ) -> Result<Option<std::fs::File>> {
        if self.local.is_none() {
            return Ok(None);
        }
        Ok(match self.get_checked(stage, meta, None)?.payload {
            GetResultPayload::File(file, _) => Some(file),
            GetResultPayload::Stream(_) => None,
        })
    }

    /// A blocking `Read` of `meta`'s object from byte `offset` to its end.
    pub fn open_sync_from(
        &self,
        stage: &'static str,
        meta: &ObjectMeta,
        offset: u64,
    ) -> Result<Box<dyn Read + Send>> {
        let handle = tokio::runtime::Handle::current();
        let result = self.get_checked(stage, meta, Some(object_store::GetRange::Offset(offset)))?;
        let stream = result.into_stream().map_err(std::io::Error::other);
        let reader = tokio_util::io::StreamReader::new(stream);
        Ok(Box::new(tokio_util::io::SyncIoBridge::new_with_handle(
            reader, handle,
        )))
    }
}

impl Root {
    /// A blocking writer of a new object at `path`, which appears whole when
    /// [`ObjectWriter::complete`] returns, or never. On a local folder it
    /// writes the file directly: going through a multipart upload there
    /// copied every byte once more into buffers that were fresh memory each
    /// time, about a tenth of a curate run's CPU. Elsewhere it is a
    /// multipart upload of `buffer`-byte parts, `in_flight` at a time. Call
    /// from a blocking thread.
    pub fn create_sync(
        &self,
        stage: &'static str,
        path: &Path,
        buffer: usize,
        in_flight: usize,
    ) -> Result<ObjectWriter> {
        let Some(local) = &self.local else {
            let upload = object_store::buffered::BufWriter::with_capacity(
                self.store.clone(),
                path.clone(),
                buffer,
            )
            .with_max_concurrency(in_flight);
            let handle = tokio::runtime::Handle::current();
            return Ok(ObjectWriter::Upload(
                tokio_util::io::SyncIoBridge::new_with_handle(upload, handle),
            ));
        };
        let io = |source| Error::Io {
            stage,
            location: self.url_of(path),
            source,
        };
        let dest = local
            .path_to_filesystem(path)
            .map_err(|e| Error::store(stage, self.url_of(path), e))?;
        // Staged beside the file under a name with '#', which listings of a
        // local store leave out, and moved into place when complete; the
        // same names object_store's own local uploads use.
        let mut n = 1u32;
        let (file, staging) = loop {
            let mut staging = dest.clone().into_os_string();
            staging.push(format!("#{n}"));
            let staging = std::path::PathBuf::from(staging);
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&staging)
            {
                Ok(file) => break (file, staging),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let dir = dest.parent().expect("a file has a folder");
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                Err(e) => return Err(io(e)),
            }
        };
        Ok(ObjectWriter::File {
            file,
            staging,
            dest,
        })
    }
}

/// A new object being written from a blocking thread: see
/// [`Root::create_sync`].
pub enum ObjectWriter {
    File {
        file: std::fs::File,
        staging: std::path::PathBuf,
        dest: std::path::PathBuf,
    },
    Upload(tokio_util::io::SyncIoBridge<object_store::buffered::BufWriter>),
}

impl std::io::Write for ObjectWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            ObjectWriter::File { file, .. } => file.write(buf),
            ObjectWriter::Upload(u) => u.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            ObjectWriter::File { file, .. } => file.flush(),
            ObjectWriter::Upload(u) => u.flush(),
        }
    }
}

impl ObjectWriter {
    /// Makes the object whole and visible.
    pub fn complete(self) -> std::io::Result<()> {
        match self {
            ObjectWriter::File { staging, dest, .. } => std::fs::rename(staging, dest),
            ObjectWriter::Upload(mut u) => u.shutdown(),
        }
    }

    /// Abandons an object that will not be completed, so that no multipart
    /// upload is left behind on S3 (its parts are kept, and billed, until
    /// aborted) and no staged file on a local disk. A failed abort is logged,
    /// not returned: the caller is already failing with the error that
    /// matters.
    pub fn abort(self, location: &str) {
        let failed = match self {
            ObjectWriter::File { file, staging, .. } => {
                drop(file);
                std::fs::remove_file(staging).err().map(|e| e.to_string())
            }
            ObjectWriter::Upload(u) => {
                let mut upload = u.into_inner();
                let handle = tokio::runtime::Handle::current();
                handle.block_on(upload.abort()).err().map(|e| e.to_string())
            }
        };
        if let Some(e) = failed {
            tracing::warn!(location, "abandoning an unfinished object failed: {e}");
        }
    }
}
