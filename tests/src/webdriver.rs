//! A real browser for the console test: Debian's `chromium` in headless
//! mode, driven by `chromedriver` over the W3C WebDriver protocol (JSON over
//! HTTP on loopback), with a minimal blocking HTTP/1.1 client (also used
//! to call the admin API directly). Nothing here skips: a missing browser
//! fails the test with how to install it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// An HTTP answer: status and body.
pub struct HttpReply {
    /// The status code.
    pub status: u16,
    /// The body, as text.
    pub body: String,
}

impl HttpReply {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request to `addr` (`host:port`), `Connection: close`.
pub fn http(
    method: &str,
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> HttpReply {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let body = body.unwrap_or("");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes()).expect("write request");
    // Read to the end of the message (servers may keep the connection).
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let (split, head) = loop {
        if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break (p, String::from_utf8_lossy(&raw[..p]).to_ascii_lowercase());
        }
        let n = stream.read(&mut buf).expect("read reply");
        assert!(n > 0, "connection closed before the headers");
        raw.extend_from_slice(&buf[..n]);
    };
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = head.contains("transfer-encoding: chunked");
    loop {
        let body = &raw[split + 4..];
        let complete = match length {
            Some(n) => body.len() >= n,
            None if chunked => body.ends_with(b"0\r\n\r\n"),
            None => false,
        };
        if complete {
            break;
        }
        let n = stream.read(&mut buf).expect("read reply");
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    let mut content = raw[split + 4..].to_vec();
    if let Some(n) = length {
        content.truncate(n);
    }
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    if chunked {
        content = dechunk(&content);
    }
    HttpReply {
        status,
        body: String::from_utf8_lossy(&content).to_string(),
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_text = String::from_utf8_lossy(&data[..eol]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or(0);
        if size == 0 {
            return out;
        }
        let start = eol + 2;
        let end = (start + size).min(data.len());
        out.extend_from_slice(&data[start..end]);
        data = &data[(end + 2).min(data.len())..];
    }
}

/// Standard base64 (screenshots come as it).
pub fn base64_decode(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => continue,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// `chromedriver` on a free port, killed when dropped.
pub struct Driver {
    child: Child,
    addr: String,
}

impl Driver {
    /// Starts chromedriver and waits for it to be ready.
    ///
    /// # Panics
    ///
    /// chromium or chromedriver is not installed (run scripts/test.sh).
    pub fn start() -> Driver {
        let missing: Vec<&str> = ["chromium", "chromedriver"]
            .into_iter()
            .filter(|b| which(b).is_none())
            .collect();
        assert!(
            missing.is_empty(),
            "{} not found: the console test needs a real browser; run scripts/test.sh, which \
             installs Debian's chromium and chromium-driver (or apt-get install -y chromium \
             chromium-driver)",
            missing.join(" and ")
        );
        let addr = crate::process::free_addr();
        let port = addr.rsplit(':').next().expect("port").to_string();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chromedriver");
        let driver = Driver { child, addr };
        let start = Instant::now();
        loop {
            if let Ok(mut s) = TcpStream::connect(&driver.addr) {
                let _ = s.write_all(b"");
                let status = http("GET", &driver.addr, "/status", &[], None);
                if status.status == 200 && status.json()["value"]["ready"] == true {
                    return driver;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "chromedriver did not become ready"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A new headless Chromium session with a `width`×`height` window.
    pub fn session(&self, width: u32, height: u32) -> Browser {
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": which("chromium").expect("chromium").to_string_lossy(),
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--hide-scrollbars",
                    format!("--window-size={width},{height}"),
                ],
            },
        }}});
        let reply = http("POST", &self.addr, "/session", &[], Some(&caps.to_string()));
        assert_eq!(reply.status, 200, "new session: {}", reply.body);
        let id = reply.json()["value"]["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string();
        Browser {
            driver: self.addr.clone(),
            id,
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One browser session.
pub struct Browser {
    driver: String,
    id: String,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.id);
        let body = body.map(|b| b.to_string());
        let reply = http(method, &self.driver, &path, &[], body.as_deref());
        assert_eq!(reply.status, 200, "{method} {path}: {}", reply.body);
        reply.json()["value"].clone()
    }

    /// Loads `url`.
    pub fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url })));
    }

    /// Runs `script` (a function body; `arguments` are `args`) and returns
    /// its result.
    pub fn eval(&self, script: &str, args: Value) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
    }

    fn find(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            "/element",
            Some(json!({ "using": "css selector", "value": css })),
        );
        v[ELEMENT].as_str().expect("element id").to_string()
    }

    /// Clicks the element matching `css`.
    pub fn click(&self, css: &str) {
        let el = self.find(css);
        self.call("POST", &format!("/element/{el}/click"), Some(json!({})));
    }

    /// Types `text` into the element matching `css`.
    pub fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css);
        self.call(
            "POST",
            &format!("/element/{el}/value"),
            Some(json!({ "text": text })),
        );
    }

    /// The visible text of the first element matching `css` ("" if none).
    pub fn text(&self, css: &str) -> String {
        self.eval(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';",
            json!([css]),
        )
        .as_str()
        .unwrap_or("")
        .to_string()
    }

    /// Waits up to 20 s for the text of `css` to contain `needle`.
    ///
    /// # Panics
    ///
    /// It never does; the panic says what was there.
    pub fn wait_text(&self, css: &str, needle: &str) -> String {
        let start = Instant::now();
        loop {
            let got = self.text(css);
            if got.contains(needle) {
                return got;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{css} never showed {needle:?}; it shows {got:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Resizes the window.
    pub fn resize(&self, width: u32, height: u32) {
        self.call(
            "POST",
            "/window/rect",
            Some(json!({ "width": width, "height": height })),
        );
    }

    /// A PNG of the viewport, written to `path`.
    pub fn screenshot(&self, path: &Path) {
        let v = self.call("GET", "/screenshot", None);
        let png = base64_decode(v.as_str().expect("base64"));
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(path, png).expect("write screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = http(
            "DELETE",
            &self.driver,
            &format!("/session/{}", self.id),
            &[],
            None,
        );
    }
}
