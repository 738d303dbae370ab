//! The HTTP/1.1 subset the API speaks: one request per connection (`Connection: close`),
//! bodies only with `Content-Length`, heads and bodies capped. Works over any byte stream, so
//! the same code serves the Unix socket and the loopback metrics port.

use std::io::{self, Read, Write};
use std::time::Duration;

/// Largest request head (request line and headers) read.
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body accepted; larger ones get 413 before they are read.
pub const MAX_BODY: usize = 64 * 1024;
/// Most header lines in a request.
const MAX_HEADERS: usize = 32;
/// How long a peer may take to send its request or read the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of an oversized body read and thrown away before closing, so that a client still
/// writing it gets to read our 413 instead of a broken pipe.
const MAX_DRAIN: u64 = 16 << 20;

/// A parsed request.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// The path without the query string.
    pub path: String,
    pub query: Option<String>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn new(method: &str, path: &str, body: &[u8]) -> Self {
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (path.to_string(), None),
        };
        Self {
            method: method.to_string(),
            path,
            query,
            body: body.to_vec(),
        }
    }
}

/// A response; always sent with `Content-Length` and `Connection: close`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// The `Allow` header of a 405.
    pub allow: Option<String>,
    /// End this process once the response is sent: a warm reboot handed everything
    /// (VMs, the API socket) to a new daemon process.
    pub then_exit: bool,
}

pub const CONTENT_TYPE_JSON: &str = "application/json";
/// The Prometheus text exposition format.
pub const CONTENT_TYPE_METRICS: &str = "text/plain; version=0.0.4; charset=utf-8";

fn one_line(message: &str) -> String {
    message
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect()
}

impl Response {
    /// A JSON response with `value` as its body.
    pub fn json<T: serde::Serialize + ?Sized>(status: u16, value: &T) -> Self {
        match serde_json::to_vec_pretty(value) {
            Ok(mut body) => {
                body.push(b'\n');
                Self {
                    status,
                    content_type: CONTENT_TYPE_JSON,
                    body,
                    allow: None,
                    then_exit: false,
                }
            }
            Err(e) => Self::error(500, &format!("cannot encode the response: {e}")),
        }
    }

    /// The API's error form: `{"error": "one line"}`.
    pub fn error(status: u16, message: &str) -> Self {
        Self::error_body(status, serde_json::json!({ "error": one_line(message) }))
    }

    /// An error of a warm reboot, with the phase it failed in.
    pub fn error_in_phase(status: u16, message: &str, phase: warmvm_vmm::handover::Phase) -> Self {
        Self::error_body(
            status,
            serde_json::json!({ "error": one_line(message), "phase": phase }),
        )
    }

    fn error_body(status: u16, value: serde_json::Value) -> Self {
        let mut body =
            serde_json::to_vec(&value).unwrap_or_else(|_| b"{\"error\":\"error\"}".to_vec());
        body.push(b'\n');
        Self {
            status,
            content_type: CONTENT_TYPE_JSON,
            body,
            allow: None,
            then_exit: false,
        }
    }

    pub fn text(status: u16, content_type: &'static str, body: String) -> Self {
        Self {
            status,
            content_type,
            body: body.into_bytes(),
            allow: None,
            then_exit: false,
        }
    }

    /// Write the whole response.
    pub fn write_to<W: Write>(&self, w: &mut W) -> io::Result<()> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        if let Some(allow) = &self.allow {
            head.push_str("Allow: ");
            head.push_str(allow);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(&self.body);
        w.write_all(&out)?;
        w.flush()
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Why no request could be read.
#[derive(Debug)]
pub enum ReadError {
    /// The peer closed the connection without sending anything.
    Closed,
    /// The connection failed or timed out; nothing can be answered.
    Io(io::Error),
    /// The request is malformed: answer with this and close. `drain` bytes of body may
    /// follow, to be read and dropped first.
    Reject { response: Response, drain: u64 },
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

fn reject(status: u16, msg: &str) -> ReadError {
    ReadError::Reject {
        response: Response::error(status, msg),
        drain: 0,
    }
}

/// Read one request from `stream`. Answers `Expect: 100-continue` itself.
pub fn read_request<S: Read + Write>(stream: &mut S) -> Result<Request, ReadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let (head_len, method, path, content_length, expect_continue) = loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Err(ReadError::Closed),
            Ok(0) => return Err(reject(400, "the request ended before its head did")),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if buf.is_empty() && is_timeout(&e) => return Err(ReadError::Io(e)),
            Err(e) if is_timeout(&e) => return Err(reject(408, "timed out reading the request")),
            Err(e) => return Err(ReadError::Io(e)),
        };
        buf.extend_from_slice(&chunk[..n]);
        // A head can only end, and a line only go wrong, at a newline: parsing again only
        // when one arrived keeps a client that sends its head a byte at a time from making
        // the parse quadratic in the head's size (AFL++ found 1-byte pieces taking seconds).
        if !chunk[..n].contains(&b'\n') {
            if buf.len() > MAX_HEAD {
                return Err(reject(431, "the request head is larger than 16 KiB"));
            }
            continue;
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let method = req.method.unwrap_or_default().to_string();
                let path = req.path.unwrap_or_default().to_string();
                let mut content_length: Option<u64> = None;
                let mut expect_continue = false;
                for h in req.headers.iter() {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        let v = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse::<u64>().ok())
                            .ok_or_else(|| reject(400, "invalid Content-Length"))?;
                        if content_length.is_some_and(|c| c != v) {
                            return Err(reject(400, "conflicting Content-Length headers"));
                        }
                        content_length = Some(v);
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        return Err(reject(
                            411,
                            "chunked request bodies are not supported: send Content-Length",
                        ));
                    } else if h.name.eq_ignore_ascii_case("expect") {
                        if h.value.eq_ignore_ascii_case(b"100-continue") {
                            expect_continue = true;
                        } else {
                            return Err(reject(400, "unsupported Expect header"));
                        }
                    }
                }
                break (
                    len,
                    method,
                    path,
                    content_length.unwrap_or(0),
                    expect_continue,
                );
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() > MAX_HEAD {
                    return Err(reject(431, "the request head is larger than 16 KiB"));
                }
            }
            Err(httparse::Error::TooManyHeaders) => {
                return Err(reject(431, "the request has too many header lines"))
            }
            Err(e) => return Err(reject(400, &format!("malformed HTTP request: {e}"))),
        }
    };
    if !path.starts_with('/') {
        return Err(reject(400, "the request target must be an absolute path"));
    }
    let already = (buf.len() - head_len) as u64;
    if content_length > MAX_BODY as u64 {
        return Err(ReadError::Reject {
            response: Response::error(
                413,
                &format!("the request body has {content_length} bytes; the limit is {MAX_BODY}"),
            ),
            // An Expect-ing client has sent nothing yet and sends nothing on a final status.
            drain: if expect_continue {
                0
            } else {
                content_length.saturating_sub(already).min(MAX_DRAIN)
            },
        });
    }
    if already > content_length {
        return Err(reject(
            400,
            "more data than Content-Length says (pipelining is not supported)",
        ));
    }
    if expect_continue && already < content_length {
        stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        stream.flush()?;
    }
    let mut body = buf.split_off(head_len);
    body.resize(content_length as usize, 0);
    if let Err(e) = stream.read_exact(&mut body[already as usize..]) {
        return Err(match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                reject(400, "the request body is shorter than Content-Length")
            }
            _ if is_timeout(&e) => reject(408, "timed out reading the request body"),
            _ => ReadError::Io(e),
        });
    }
    let mut req = Request::new(&method, &path, &[]);
    req.body = body;
    Ok(req)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Read and drop up to `n` bytes (the rest of a rejected body).
pub fn drain<R: Read>(stream: &mut R, n: u64) {
    if n > 0 {
        let _ = io::copy(&mut stream.take(n), &mut io::sink());
    }
}

/// A response as a client reads it.
#[derive(Debug, Clone)]
pub struct ClientResponse {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

/// Parse a whole response (the server closes the connection after it).
pub fn parse_response(data: &[u8]) -> Result<ClientResponse, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(data) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Err("the response ended inside its head".into()),
        Err(e) => return Err(format!("malformed HTTP response: {e}")),
    };
    let status = resp.code.unwrap_or(0);
    if status == 100 {
        // An interim answer to Expect: the final one follows.
        return parse_response(&data[head_len..]);
    }
    let mut content_type = None;
    let mut length = None;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-type") {
            content_type = Some(String::from_utf8_lossy(h.value).into_owned());
        } else if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok());
        }
    }
    let rest = &data[head_len..];
    let body = match length {
        Some(len) if len > rest.len() => {
            return Err(format!(
                "the response body has {} of {len} bytes",
                rest.len()
            ))
        }
        Some(len) => rest[..len].to_vec(),
        None => rest.to_vec(),
    };
    Ok(ClientResponse {
        status,
        content_type,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that reads from a script, one chunk per read, and records what is written.
    struct Duplex {
        input: std::collections::VecDeque<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let Some(mut chunk) = self.input.pop_front() else {
                return Ok(0);
            };
            let n = chunk.len().min(buf.len());
            buf[..n].copy_from_slice(&chunk[..n]);
            if n < chunk.len() {
                self.input.push_front(chunk.split_off(n));
            }
            Ok(n)
        }
    }
    impl Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn read_chunks(chunks: &[&str]) -> (Result<Request, ReadError>, Vec<u8>) {
        let mut d = Duplex {
            input: chunks.iter().map(|c| c.as_bytes().to_vec()).collect(),
            output: Vec::new(),
        };
        let r = read_request(&mut d);
        (r, d.output)
    }

    /// Read `raw` in 7-byte pieces, to exercise reassembly of the head.
    fn read(raw: &str) -> (Result<Request, ReadError>, Vec<u8>) {
        let pieces: Vec<&str> = raw
            .as_bytes()
            .chunks(7)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        read_chunks(&pieces)
    }

    fn status_of(r: Result<Request, ReadError>) -> u16 {
        match r {
            Err(ReadError::Reject { response, .. }) => response.status,
            Ok(_) => 200,
            Err(e) => panic!("{e:?}"),
        }
    }

    #[test]
    fn reads_a_request_with_body_and_query() {
        let (r, out) =
            read("POST /v1/vms?x=1 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\n\r\nabcd");
        let r = r.unwrap();
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/v1/vms");
        assert_eq!(r.query.as_deref(), Some("x=1"));
        assert_eq!(r.body, b"abcd");
        assert!(out.is_empty());
    }

    #[test]
    fn answers_expect_continue() {
        let (r, out) = read_chunks(&[
            "PUT /a HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
            "hi",
        ]);
        assert_eq!(r.unwrap().body, b"hi");
        assert_eq!(out, b"HTTP/1.1 100 Continue\r\n\r\n");
    }

    #[test]
    fn rejects_what_it_does_not_support() {
        let big = format!(
            "POST /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert_eq!(status_of(read(&big).0), 413);
        assert_eq!(
            status_of(read("POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").0),
            411
        );
        assert_eq!(
            status_of(read("POST /a HTTP/1.1\r\nContent-Length: x\r\n\r\n").0),
            400
        );
        assert_eq!(status_of(read("GARBAGE\r\n\r\n").0), 400);
        assert_eq!(
            status_of(read("POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nab").0),
            400
        );
        let long_head = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_HEAD + 10));
        assert_eq!(status_of(read(&long_head).0), 431);
        assert!(matches!(read("").0, Err(ReadError::Closed)));
    }

    #[test]
    fn errors_are_one_line_json() {
        let r = Response::error(400, "two\nlines");
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["error"], "two lines");
    }

    #[test]
    fn responses_round_trip() {
        let mut out = Vec::new();
        let mut r = Response::error(405, "no");
        r.allow = Some("GET".into());
        r.write_to(&mut out).unwrap();
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.contains("Allow: GET\r\n"), "{text}");
        let parsed = parse_response(&out).unwrap();
        assert_eq!(parsed.status, 405);
        assert_eq!(parsed.body, r.body);
    }
}
