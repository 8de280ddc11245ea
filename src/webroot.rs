//! A route's `web_root`: plain GET and HEAD requests under the route's path are answered
//! from a folder (websockify's `--web`), so that one address serves noVNC's page and its
//! WebSocket. `index.html` for a folder, content types by extension, ETag and Last-Modified
//! with 304 answers, no listings. Files stream from disk in 16 KiB pieces.
//!
//! Nothing outside the folder is ever served: the request path was normalised before routing
//! (dot segments refused, unreserved escapes decoded); here every remaining escape is decoded
//! per segment and a segment that decodes to `.`, `..` or holds `/`, `\` or NUL is refused;
//! the file found is canonicalised and must still be inside the canonical root, so a symlink
//! that leads out of it is not followed out.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, ReadBuf};

const PIECE: usize = 16 << 10;

/// A file's bytes as a response body, read as the client takes them.
pub struct FileBody {
    file: Option<tokio::fs::File>,
    remaining: u64,
    buf: BytesMut,
}

impl FileBody {
    fn empty() -> FileBody {
        FileBody {
            file: None,
            remaining: 0,
            buf: BytesMut::new(),
        }
    }
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        let Some(file) = this.file.as_mut() else {
            return Poll::Ready(None);
        };
        if this.remaining == 0 {
            this.file = None;
            return Poll::Ready(None);
        }
        let want = PIECE.min(this.remaining as usize);
        this.buf.resize(want, 0);
        let mut read = ReadBuf::new(&mut this.buf[..want]);
        match Pin::new(file).poll_read(cx, &mut read) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Ok(())) => {
                let n = read.filled().len();
                if n == 0 {
                    // The file shrank while it was served: end here rather than hang.
                    this.file = None;
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the file got shorter while it was sent",
                    ))));
                }
                this.remaining -= n as u64;
                let piece = this.buf.split_to(n).freeze();
                Poll::Ready(Some(Ok(Frame::data(piece))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.file.is_none() || self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// The answer to a plain request under a web root: a file, 304, or a short error.
pub enum Served {
    File(Box<Response<FileBody>>),
    Error(StatusCode, &'static str),
}

/// Serves `rest` (the request path after the route's prefix, still escaped) from `root`.
pub async fn serve(root: &Path, rest: &str, method: &Method, headers: &HeaderMap) -> Served {
    if method != Method::GET && method != Method::HEAD {
        return Served::Error(StatusCode::METHOD_NOT_ALLOWED, "use GET or HEAD\n");
    }
    let Some(relative) = relative_path(rest) else {
        return Served::Error(StatusCode::NOT_FOUND, "not found\n");
    };
    let root = root.to_path_buf();
    let found = tokio::task::spawn_blocking(move || locate(&root, &relative)).await;
    let Ok(Some((path, meta))) = found else {
        return Served::Error(StatusCode::NOT_FOUND, "not found\n");
    };
    let modified = meta.modified().ok();
    let etag = etag(meta.len(), modified);
    let mut response = Response::new(FileBody::empty());
    let h = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, value);
    }
    if let Some(time) = modified
        && let Ok(value) = HeaderValue::from_str(&httpdate::fmt_http_date(time))
    {
        h.insert(header::LAST_MODIFIED, value);
    }
    if not_modified(headers, &etag, modified) {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        return Served::File(Box::new(response));
    }
    let mime = mime_guess::from_path(&path).first_or_octet_stream();
    if let Ok(value) = HeaderValue::from_str(mime.as_ref()) {
        h.insert(header::CONTENT_TYPE, value);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(meta.len()));
    if method == Method::HEAD {
        return Served::File(Box::new(response));
    }
    match tokio::fs::File::open(&path).await {
        Ok(file) => {
            *response.body_mut() = FileBody {
                file: Some(file),
                remaining: meta.len(),
                buf: BytesMut::new(),
            };
            Served::File(Box::new(response))
        }
        Err(_) => Served::Error(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The path below the root as plain segments, or `None` when a segment could step out.
fn relative_path(rest: &str) -> Option<PathBuf> {
    let mut path = PathBuf::new();
    for segment in rest.split('/').filter(|s| !s.is_empty()) {
        let decoded = percent_decode(segment)?;
        if decoded == "."
            || decoded == ".."
            || decoded.contains(['/', '\\', '\0'])
            || Path::new(&decoded).is_absolute()
        {
            return None;
        }
        path.push(decoded);
    }
    Some(path)
}

fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The file to serve (a folder's index.html), if it is inside the root after every symlink.
fn locate(root: &Path, relative: &Path) -> Option<(PathBuf, std::fs::Metadata)> {
    let root = root.canonicalize().ok()?;
    let mut path = root.join(relative).canonicalize().ok()?;
    if !path.starts_with(&root) {
        return None;
    }
    if path.is_dir() {
        path = path.join("index.html").canonicalize().ok()?;
        if !path.starts_with(&root) {
            return None;
        }
    }
    let meta = std::fs::metadata(&path).ok()?;
    meta.is_file().then_some((path, meta))
}

/// A weak validator from size and modification time, as nginx makes it.
fn etag(len: u64, modified: Option<SystemTime>) -> String {
    let secs = modified
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    format!("W/\"{secs:x}-{len:x}\"")
}

/// RFC 9110 §13.1: If-None-Match wins over If-Modified-Since.
fn not_modified(headers: &HeaderMap, etag: &str, modified: Option<SystemTime>) -> bool {
    if let Some(tags) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    {
        let bare = etag.trim_start_matches("W/");
        return tags
            .split(',')
            .map(str::trim)
            .any(|t| t == "*" || t.trim_start_matches("W/") == bare);
    }
    let since = headers
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    match (since, modified) {
        (Some(since), Some(modified)) => {
            // HTTP dates have whole seconds.
            let modified_secs = modified
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let since_secs = since
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            modified_secs <= since_secs
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_could_step_out_are_refused() {
        assert_eq!(relative_path("/a/b.html"), Some(PathBuf::from("a/b.html")));
        assert_eq!(relative_path(""), Some(PathBuf::new()));
        for bad in [
            "/..",
            "/a/%2e%2e/b",
            "/%2E%2e",
            "/a%2Fb",
            "/a%5Cb",
            "/%00",
            "/%zz",
            "/.",
        ] {
            assert_eq!(relative_path(bad), None, "{bad}");
        }
    }
}
