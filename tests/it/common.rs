//! Test harness: the real `tidegate` binary (gateway and mock provider) on
//! loopback ports, and a small SSE reader. Every wait is bounded.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_tidegate");

/// A child process of ours that is killed when dropped.
pub struct Proc {
    pub child: Child,
    pub addr: String,
    pub log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Proc {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Wait for exit, at most `limit`.
    pub async fn exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => status.expect("wait works"),
            Err(_) => panic!(
                "process did not exit within {limit:?}; log:\n{}",
                self.log_text()
            ),
        }
    }

    /// SIGKILL, and wait until the process is gone (its port and its
    /// store's lock are free again), at most 10 s.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        self.exit(Duration::from_secs(10)).await;
    }

    /// The process's resident memory, in MiB.
    pub fn rss_mib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kb / 1024
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Poll the log until it holds `needle`; panics after `limit`.
    pub async fn wait_log(&self, needle: &str, limit: Duration) {
        let found = eventually(limit, || async { self.log_text().contains(needle) }).await;
        assert!(
            found,
            "no {needle:?} in the log after {limit:?}:\n{}",
            self.log_text()
        );
    }
}

/// Poll `check` every 5 ms until it holds or `limit` passes; whether it held.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Start the binary with `args`; wait for its `listening on` line.
pub async fn spawn(args: &[&str], env: &[(&str, &str)], log: &Path) -> Proc {
    let log_file = std::fs::File::create(log).expect("log file");
    let mut command = Command::new(BIN);
    command
        .args(args)
        .stdout(Stdio::piped())
        .stderr(log_file)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .env("RUST_LOG", "info");
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("spawn tidegate");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no listening line; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        })
        .expect("read stdout")
        .unwrap_or_else(|| {
            panic!(
                "exited before listening; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        });
    let addr = line
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    Proc {
        child,
        addr,
        log: log.to_owned(),
    }
}

pub fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tidegate-it-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{nanos}", N.fetch_add(1, Ordering::Relaxed))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

pub struct Mock {
    pub proc: Proc,
}

impl Mock {
    pub async fn start(dir: &Path) -> Mock {
        Mock {
            proc: spawn(
                &["mock-upstream", "--listen", "127.0.0.1:0"],
                &[],
                &dir.join("mock.log"),
            )
            .await,
        }
    }

    /// A mock that demands `key`, like a real provider.
    pub async fn with_key(dir: &Path, key: &str) -> Mock {
        Mock::with_key_at(dir, key, "127.0.0.1:0", "mock.log").await
    }

    /// [`with_key`](Self::with_key) on a given address, logging to `log`:
    /// a provider restarted on the address it had, which has forgotten
    /// every response it kept in memory.
    pub async fn with_key_at(dir: &Path, key: &str, listen: &str, log: &str) -> Mock {
        let env = [("TIDEGATE_MOCK_API_KEY", key)];
        let args = ["mock-upstream", "--listen", listen];
        Mock {
            proc: spawn(&args, &env, &dir.join(log)).await,
        }
    }

    /// A mock started with more flags (`--down`, `--fail-rate 0.1`, …).
    pub async fn with_args(dir: &Path, args: &[&str]) -> Mock {
        std::fs::create_dir_all(dir).unwrap();
        let mut all = vec!["mock-upstream", "--listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        Mock {
            proc: spawn(&all, &[], &dir.join("mock.log")).await,
        }
    }

    /// Change the instance's faults while it runs (`PUT /mock/faults`).
    pub async fn set_faults(&self, faults: Value) {
        let r = client()
            .put(format!("{}/mock/faults", self.proc.url()))
            .json(&faults)
            .send()
            .await
            .expect("faults");
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    }

    pub fn base_url(&self) -> String {
        format!("{}/v1", self.proc.url())
    }

    /// The last requests it received (`GET /mock/requests`).
    pub async fn requests(&self) -> Vec<Value> {
        client()
            .get(format!("{}/mock/requests", self.proc.url()))
            .send()
            .await
            .expect("requests")
            .json()
            .await
            .expect("requests json")
    }

    pub async fn stats(&self) -> Value {
        client()
            .get(format!("{}/mock/stats", self.proc.url()))
            .send()
            .await
            .expect("stats")
            .json()
            .await
            .expect("stats json")
    }

    pub async fn stat(&self, name: &str) -> u64 {
        // An unknown name fails the test: a renamed counter must not read 0.
        self.stats().await[name]
            .as_u64()
            .unwrap_or_else(|| panic!("the mock has no counter `{name}`"))
    }

    /// The exact answer the mock gives `request` (asked directly, not streamed).
    pub async fn answer(&self, request: &Value) -> String {
        let mut body = request.clone();
        body["stream"] = json!(false);
        if let Some(mock) = body.get_mut("mock").and_then(Value::as_object_mut) {
            mock.retain(|k, _| k == "words");
        }
        let v: Value = client()
            .post(format!("{}/chat/completions", self.base_url()))
            .json(&body)
            .send()
            .await
            .expect("mock answers")
            .json()
            .await
            .expect("json");
        v["choices"][0]["message"]["content"]
            .as_str()
            .expect("content")
            .to_owned()
    }

    /// Poll until `stat >= want` or `limit` passes; returns the last value.
    pub async fn wait_for(&self, name: &str, want: u64, limit: Duration) -> u64 {
        let until = tokio::time::Instant::now() + limit;
        loop {
            let v = self.stat(name).await;
            if v >= want || tokio::time::Instant::now() >= until {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A gateway config pointing at `mock`, on `listen`, with `store` lines.
pub fn config(mock: &Mock, listen: &str, store: &str, extra: &str) -> String {
    format!(
        r#"listen = "{listen}"
{extra}
[store]
{store}

[[upstreams]]
name = "mock"
protocol = "openai"
base_url = "{}"
models = ["*"]
continuation = "continue_final_message"
first_byte_timeout = "2s"
idle_timeout = "1s"
"#,
        mock.base_url()
    )
}

pub fn embedded(dir: &Path) -> String {
    format!(
        "kind = \"embedded\"\npath = \"{}\"",
        dir.join("data").display()
    )
}

pub struct Gateway {
    pub proc: Proc,
}

impl Gateway {
    /// The gateway's resident memory, in MiB.
    pub fn rss_mib(&self) -> u64 {
        self.proc.rss_mib()
    }

    pub async fn start(dir: &Path, config: &str) -> Gateway {
        Gateway::start_with(dir, config, &[], &[]).await
    }

    pub async fn start_with(
        dir: &Path,
        config: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Gateway {
        let n = rand_suffix();
        let path = dir.join(format!("gateway-{n}.toml"));
        std::fs::write(&path, config).expect("write config");
        let path_text = path.display().to_string();
        let mut all = vec!["serve", "--config", path_text.as_str()];
        all.extend_from_slice(args);
        Gateway {
            proc: spawn(&all, env, &dir.join(format!("gateway-{n}.log"))).await,
        }
    }

    /// A sample's value from `/metrics`; panics on a name it does not show
    /// (a renamed metric must fail the test, not read as 0).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = client()
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name}:\n{text}"))
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.proc.url())
    }
}

pub fn chat(words: u64, interval_ms: u64, topic: &str) -> Value {
    json!({
        "model": "mock-model",
        "messages": [{"role": "user", "content": format!("tell me about {topic} and tides and gates")}],
        "stream": true,
        "max_tokens": words,
        "mock": {"token_interval_ms": interval_ms}
    })
}

#[derive(Debug, Clone)]
pub struct SseEvent {
    pub id: Option<u64>,
    pub event: Option<String>,
    pub data: String,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or(Value::Null)
    }
    pub fn is_done(&self) -> bool {
        self.data == "[DONE]"
    }
    pub fn error(&self) -> Option<Value> {
        self.json().get("error").cloned()
    }
}

/// An open SSE response read event by event.
pub struct Sse {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    response: reqwest::Response,
    buf: String,
}

impl Sse {
    pub async fn post(url: &str, body: &Value) -> Sse {
        Sse::from(client().post(url).json(body).send().await.expect("post")).await
    }

    pub async fn get(url: &str, headers: &[(&str, &str)]) -> Sse {
        let mut req = client().get(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Sse::from(req.send().await.expect("get")).await
    }

    pub async fn from(response: reqwest::Response) -> Sse {
        Sse {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            response,
            buf: String::new(),
        }
    }

    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    }

    /// The next event (comments and `retry:` skipped); `None` at the end of
    /// the body or if the connection breaks.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(pos) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..pos + 2).collect();
                let mut event = SseEvent {
                    id: None,
                    event: None,
                    data: String::new(),
                };
                let mut has_data = false;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        event.id = v.parse().ok();
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        event.event = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        if has_data {
                            event.data.push('\n');
                        }
                        event.data.push_str(v);
                        has_data = true;
                    }
                }
                if has_data {
                    return Some(event);
                }
                continue;
            }
            match tokio::time::timeout(Duration::from_secs(30), self.response.chunk()).await {
                Ok(Ok(Some(bytes))) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                _ => return None,
            }
        }
    }

    /// Every remaining event.
    pub async fn rest(&mut self) -> Vec<SseEvent> {
        let mut out = Vec::new();
        while let Some(e) = self.next().await {
            out.push(e);
        }
        out
    }

    pub async fn take(&mut self, n: usize) -> Vec<SseEvent> {
        let mut out = Vec::new();
        while out.len() < n {
            match self.next().await {
                Some(e) => out.push(e),
                None => break,
            }
        }
        out
    }
}

/// The text of OpenAI chunks (abort events and `[DONE]` skipped).
pub fn text_of(events: &[SseEvent]) -> String {
    events
        .iter()
        .filter(|e| e.id.is_some())
        .filter_map(|e| {
            e.json()
                .pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .collect()
}

pub fn ids_of(events: &[SseEvent]) -> Vec<u64> {
    events.iter().filter_map(|e| e.id).collect()
}

pub fn assert_contiguous(ids: &[u64]) {
    let expected: Vec<u64> = (1..=ids.len() as u64).collect();
    assert_eq!(
        ids,
        expected.as_slice(),
        "ids must run 1..N without gap or repeat"
    );
}
