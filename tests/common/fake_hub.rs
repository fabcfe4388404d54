//! A local stand-in for the Hugging Face hub on 127.0.0.1, speaking the endpoints a download
//! uses the way the hub does:
//!
//! - `GET /api/models/{repo}/revision/{rev}?blobs=true`: the commit and each file's size, git
//!   blob id and (for LFS files) sha256; `GET /api/models/{repo}/tree/{rev}`: the file listing;
//! - `GET /{repo}/resolve/{rev}/{file}`: `X-Repo-Commit` and an `ETag` (the git blob id) with the
//!   content for small files; for LFS files (`*.safetensors`) a 302 to a CDN address with
//!   `X-Linked-Etag` (the sha256) and `X-Linked-Size`, like the hub's redirect to its storage;
//! - `GET /cdn/{sha256}`: the content, with `Range` support (206, `Content-Range`).
//!
//! Gated repositories answer 401 without a token and 403 with a wrong one; unknown repositories
//! 401 without a token and 404 with one. Faults for tests: answer 503 to the next requests, serve
//! a file damaged once, or stall a CDN transfer after some bytes.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha1::Sha1;
use sha2::{Digest, Sha256};

#[derive(Default)]
struct Repo {
    /// Branches and tags → commit.
    refs: HashMap<String, String>,
    commits: HashMap<String, BTreeMap<String, Arc<Vec<u8>>>>,
    /// The token a gated repository wants.
    gated: Option<String>,
}

#[derive(Default)]
struct State {
    repos: HashMap<String, Repo>,
    blobs: HashMap<String, Arc<Vec<u8>>>,
    /// Request lines with their Range header, in order.
    log: Vec<String>,
    /// Requests still to answer with 503, and the text their path must contain.
    fail_next: usize,
    fail_matching: String,
    /// File names to serve damaged, once each.
    damage_once: Vec<String>,
    /// A CDN blob (sha256) whose transfer stops after this many bytes, and bytes of it sent.
    stall: Option<(String, usize)>,
    stalled_at: Option<usize>,
}

pub struct FakeHub {
    pub endpoint: String,
    state: Arc<Mutex<State>>,
}

pub fn sha256_hex(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}

pub fn git_blob_id(b: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(format!("blob {}\0", b.len()).as_bytes());
    h.update(b);
    hex(&h.finalize())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn is_lfs(file: &str) -> bool {
    file.ends_with(".safetensors")
}

impl FakeHub {
    /// Starts the hub and its "CDN" (another port, so clients see another host, as with the hub's
    /// storage).
    pub fn start() -> FakeHub {
        let state = Arc::new(Mutex::new(State::default()));
        let cdn = TcpListener::bind("127.0.0.1:0").unwrap();
        let cdn_endpoint = format!("http://{}", cdn.local_addr().unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        for l in [cdn, listener] {
            let (st, cdn_endpoint) = (Arc::clone(&state), cdn_endpoint.clone());
            std::thread::spawn(move || {
                for conn in l.incoming().flatten() {
                    let (st, cdn_endpoint) = (Arc::clone(&st), cdn_endpoint.clone());
                    std::thread::spawn(move || serve(conn, &st, &cdn_endpoint));
                }
            });
        }
        FakeHub { endpoint, state }
    }

    /// Publishes `files` as a new commit of `repo` on `branch`; returns the commit id.
    pub fn commit(&self, repo: &str, branch: &str, files: Vec<(String, Vec<u8>)>) -> String {
        let mut st = self.state.lock().unwrap();
        let mut tree = BTreeMap::new();
        let mut h = Sha1::new();
        h.update(repo.as_bytes());
        h.update(st.repos.get(repo).map_or(0, |r| r.commits.len()).to_le_bytes());
        for (name, content) in files {
            h.update(name.as_bytes());
            h.update(&content);
            let content = Arc::new(content);
            st.blobs.insert(sha256_hex(&content), Arc::clone(&content));
            tree.insert(name, content);
        }
        let commit = hex(&h.finalize());
        let r = st.repos.entry(repo.to_string()).or_default();
        r.commits.insert(commit.clone(), tree);
        r.refs.insert(branch.to_string(), commit.clone());
        commit
    }


    pub fn tag(&self, repo: &str, tag: &str, commit: &str) {
        self.state.lock().unwrap().repos.get_mut(repo).unwrap().refs.insert(tag.into(), commit.into());
    }

    pub fn gate(&self, repo: &str, token: &str) {
        self.state.lock().unwrap().repos.get_mut(repo).unwrap().gated = Some(token.into());
    }

    /// Answers 503 to the next `n` requests whose path contains `pattern`.
    pub fn fail_next(&self, pattern: &str, n: usize) {
        let mut st = self.state.lock().unwrap();
        st.fail_next = n;
        st.fail_matching = pattern.into();
    }

    pub fn damage_once(&self, file: &str) {
        self.state.lock().unwrap().damage_once.push(file.into());
    }

    /// Stops sending the blob with this content after `bytes` bytes (the connection hangs).
    pub fn stall(&self, content: &[u8], bytes: usize) {
        let mut st = self.state.lock().unwrap();
        st.stall = Some((sha256_hex(content), bytes));
        st.stalled_at = None;
    }

    /// Bytes sent of the stalled blob once the transfer has stalled.
    pub fn stalled_at(&self) -> Option<usize> {
        self.state.lock().unwrap().stalled_at
    }

    pub fn clear_stall(&self) {
        self.state.lock().unwrap().stall = None;
    }

    /// Every request so far: `METHOD path [range]`.
    pub fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }
}

/// The files of a local folder (recursively), named relative to it.
pub fn folder_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    collect(dir, dir, &mut files);
    files
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            collect(root, &p, out);
        } else {
            let name = p.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
            out.push((name, std::fs::read(&p).unwrap()));
        }
    }
}

struct Req {
    method: String,
    path: String,
    range: Option<(usize, Option<usize>)>,
    token: Option<String>,
}

fn read_request(conn: &TcpStream) -> Option<Req> {
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
    let (mut range, mut token) = (None, None);
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 || h.trim().is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        let v = v.trim();
        match k.trim().to_ascii_lowercase().as_str() {
            "range" => {
                let spec = v.strip_prefix("bytes=")?;
                let (a, b) = spec.split_once('-')?;
                range = Some((a.parse().ok()?, b.parse().ok()));
            }
            "authorization" => token = v.strip_prefix("Bearer ").map(String::from),
            _ => {}
        }
    }
    Some(Req { method, path, range, token })
}

fn respond(mut conn: &TcpStream, status: &str, headers: &[(String, String)], body: &[u8], head_only: bool) {
    let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let _ = conn.write_all(out.as_bytes());
    if !head_only {
        let _ = conn.write_all(body);
    }
}

fn serve(conn: TcpStream, state: &Mutex<State>, cdn_endpoint: &str) {
    let Some(req) = read_request(&conn) else { return };
    let head = req.method == "HEAD";
    {
        let mut st = state.lock().unwrap();
        let range = req.range.map(|(a, b)| format!(" bytes={a}-{}", b.map(|b| b.to_string()).unwrap_or_default())).unwrap_or_default();
        st.log.push(format!("{} {}{range}", req.method, req.path));
        if st.fail_next > 0 && req.path.contains(&st.fail_matching) {
            st.fail_next -= 1;
            drop(st);
            return respond(&conn, "503 Service Unavailable", &[], b"try later", head);
        }
    }
    let (path, query) = req.path.split_once('?').unwrap_or((&req.path, ""));
    let path = path.to_string();
    if let Some(sha) = path.strip_prefix("/cdn/") {
        let file = query.strip_prefix("file=").unwrap_or("");
        return cdn(&conn, state, sha, file, req.range, head);
    }
    if let Some(rest) = path.strip_prefix("/api/models/") {
        if let Some((repo, rev)) = rest.split_once("/revision/") {
            return api(&conn, state, repo, &rev.replace("%2F", "/"), &req, head, false);
        }
        if let Some((repo, rev)) = rest.split_once("/tree/") {
            return api(&conn, state, repo, &rev.replace("%2F", "/"), &req, head, true);
        }
        return respond(&conn, "404 Not Found", &[], b"", head);
    }
    // /{repo}/resolve/{rev}/{file}; the repo id has one slash at most.
    let Some((repo, rest)) = path.trim_start_matches('/').split_once("/resolve/") else {
        return respond(&conn, "404 Not Found", &[], b"", head);
    };
    let Some((rev, file)) = rest.split_once('/') else { return respond(&conn, "404 Not Found", &[], b"", head) };
    resolve(&conn, state, repo, &rev.replace("%2F", "/"), file, &req, cdn_endpoint, head);
}

/// The commit and tree of `repo` at `rev`, or the status to answer.
fn lookup(st: &State, repo: &str, rev: &str, token: &Option<String>, gate: bool) -> Result<(String, BTreeMap<String, Arc<Vec<u8>>>), &'static str> {
    let Some(r) = st.repos.get(repo) else {
        return Err(if token.is_some() { "404 Not Found" } else { "401 Unauthorized" });
    };
    if let (true, Some(want)) = (gate, &r.gated) {
        match token {
            None => return Err("401 Unauthorized"),
            Some(t) if t != want => return Err("403 Forbidden"),
            _ => {}
        }
    }
    let commit = r.refs.get(rev).cloned().or_else(|| r.commits.contains_key(rev).then(|| rev.to_string()));
    let commit = commit.ok_or("404 Not Found")?;
    Ok((commit.clone(), r.commits[&commit].clone()))
}

/// The model info (`/revision/`) or, with `tree`, the file listing (`/tree/`) Python's
/// `snapshot_download` reads.
#[allow(clippy::too_many_arguments)]
fn api(conn: &TcpStream, state: &Mutex<State>, repo: &str, rev: &str, req: &Req, head: bool, tree_listing: bool) {
    // Like the hub, a gated repository's listing is public; only its files need the token.
    let found = lookup(&state.lock().unwrap(), repo, rev, &req.token, false);
    let (commit, tree) = match found {
        Ok(x) => x,
        Err(status) => return respond(conn, status, &[], b"{\"error\":\"not found\"}", head),
    };
    if tree_listing {
        let entries: Vec<serde_json::Value> = tree.iter().map(|(name, content)| {
            let mut e = serde_json::json!({"type": "file", "path": name, "size": content.len(), "oid": git_blob_id(content)});
            if is_lfs(name) {
                e["lfs"] = serde_json::json!({"oid": sha256_hex(content), "size": content.len(), "pointerSize": 134});
            }
            e
        }).collect();
        let body = serde_json::Value::Array(entries).to_string();
        return respond(conn, "200 OK", &[("Content-Type".into(), "application/json".into())], body.as_bytes(), head);
    }
    let siblings: Vec<serde_json::Value> = tree.iter().map(|(name, content)| {
        let mut s = serde_json::json!({"rfilename": name, "size": content.len(), "blobId": git_blob_id(content)});
        if is_lfs(name) {
            s["lfs"] = serde_json::json!({"sha256": sha256_hex(content), "size": content.len(), "pointerSize": 134});
        }
        s
    }).collect();
    let body = serde_json::json!({"id": repo, "modelId": repo, "sha": commit, "siblings": siblings}).to_string();
    respond(conn, "200 OK", &[("Content-Type".into(), "application/json".into())], body.as_bytes(), head);
}

#[allow(clippy::too_many_arguments)]
fn resolve(conn: &TcpStream, state: &Mutex<State>, repo: &str, rev: &str, file: &str, req: &Req, cdn_endpoint: &str, head: bool) {
    let found = lookup(&state.lock().unwrap(), repo, rev, &req.token, true);
    let (commit, tree) = match found {
        Ok(x) => x,
        Err(status) => return respond(conn, status, &[], b"", head),
    };
    let Some(content) = tree.get(file) else {
        return respond(conn, "404 Not Found", &[("X-Error-Code".into(), "EntryNotFound".into())], b"", head);
    };
    let mut headers = vec![("X-Repo-Commit".to_string(), commit), ("ETag".to_string(), format!("\"{}\"", git_blob_id(content)))];
    if is_lfs(file) {
        let sha = sha256_hex(content);
        headers.push(("X-Linked-Etag".into(), format!("\"{sha}\"")));
        headers.push(("X-Linked-Size".into(), content.len().to_string()));
        headers.push(("Location".into(), format!("{cdn_endpoint}/cdn/{sha}?file={file}")));
        return respond(conn, "302 Found", &headers, b"", head);
    }
    let mut content = content.to_vec();
    if req.range != Some((0, Some(0))) {
        damage_if_asked(state, file, &mut content);
    }
    let (status, body, extra) = ranged(&content, req.range);
    headers.extend(extra);
    respond(conn, status, &headers, &body, head);
}

fn damage_if_asked(state: &Mutex<State>, file: &str, content: &mut [u8]) {
    let mut st = state.lock().unwrap();
    if let Some(i) = st.damage_once.iter().position(|f| f == file) {
        st.damage_once.remove(i);
        if let Some(b) = content.last_mut() {
            *b ^= 0x55;
        }
    }
}

fn ranged(content: &[u8], range: Option<(usize, Option<usize>)>) -> (&'static str, Vec<u8>, Vec<(String, String)>) {
    match range {
        None => ("200 OK", content.to_vec(), vec![]),
        Some((start, end)) => {
            let last = end.unwrap_or(usize::MAX).min(content.len().saturating_sub(1));
            if start >= content.len() {
                return ("416 Range Not Satisfiable", vec![], vec![("Content-Range".into(), format!("bytes */{}", content.len()))]);
            }
            let body = content[start..=last].to_vec();
            ("206 Partial Content", body, vec![("Content-Range".into(), format!("bytes {start}-{last}/{}", content.len()))])
        }
    }
}

fn cdn(mut conn: &TcpStream, state: &Mutex<State>, sha: &str, file: &str, range: Option<(usize, Option<usize>)>, head: bool) {
    let (content, stall) = {
        let st = state.lock().unwrap();
        let Some(content) = st.blobs.get(sha).cloned() else {
            drop(st);
            return respond(conn, "404 Not Found", &[], b"", head);
        };
        (content, st.stall.clone().filter(|(s, _)| s == sha).map(|(_, n)| n))
    };
    let mut content = content.to_vec();
    if range != Some((0, Some(0))) {
        damage_if_asked(state, file, &mut content);
    }
    let (status, body, headers) = ranged(&content, range);
    let start = range.map_or(0, |r| r.0);
    match stall {
        Some(limit) if !head && body.len() > 1 && start < limit => {
            // Headers for the whole range, then only part of the body, then silence.
            let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
            for (k, v) in &headers {
                out.push_str(&format!("{k}: {v}\r\n"));
            }
            out.push_str("\r\n");
            let _ = conn.write_all(out.as_bytes());
            let _ = conn.write_all(&body[..limit - start]);
            let _ = conn.flush();
            state.lock().unwrap().stalled_at = Some(limit);
            std::thread::sleep(Duration::from_secs(120));
        }
        _ => respond(conn, status, &headers, &body, head),
    }
}
