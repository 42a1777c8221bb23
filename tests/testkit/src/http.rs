//! A minimal HTTP/1.1 client over a plain TCP socket: one request per connection.
//!
//! The simulated caller needs to post forms with a `Host` that differs from the socket it
//! dials (a load balancer in front of relays) and to see exact status codes; a full client
//! crate would be more weight than this.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response body read (TwiML is at most 64 kB).
const MAX_RESPONSE: usize = 256 * 1024;

/// A response: status, headers (lowercased names), body text.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// First header value with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("malformed response: {0}")]
    Malformed(String),
}

/// `application/x-www-form-urlencoded` encoding of one value, as Twilio sends it (space as
/// `+`; `*`, `-`, `.`, `_` and alphanumerics as they are).
pub fn form_encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Encodes a whole form.
pub fn form_body(params: &[(String, String)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params)
        .finish()
}

/// Sends one request and reads the whole response.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path_and_query: &str,
    headers: &[(String, String)],
    body: Option<(&str, String)>,
    limit: Duration,
) -> Result<HttpResponse, HttpError> {
    tokio::time::timeout(
        limit,
        request_inner(addr, method, host, path_and_query, headers, body),
    )
    .await
    .map_err(|_| HttpError::Timeout(limit))?
}

async fn request_inner(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path_and_query: &str,
    headers: &[(String, String)],
    body: Option<(&str, String)>,
) -> Result<HttpResponse, HttpError> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|source| HttpError::Connect { addr, source })?;
    let mut head =
        format!("{method} {path_and_query} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = match body {
        Some((content_type, body)) => {
            head.push_str(&format!(
                "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
                body.len()
            ));
            body
        }
        None => String::new(),
    };
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    let mut raw = Vec::new();
    (&mut stream)
        .take(MAX_RESPONSE as u64)
        .read_to_end(&mut raw)
        .await?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Result<HttpResponse, HttpError> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| HttpError::Malformed("no end of headers".into()))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| HttpError::Malformed(format!("status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut body: &str) -> Result<String, HttpError> {
    let mut out = String::new();
    loop {
        let (size_line, rest) = body
            .split_once("\r\n")
            .ok_or_else(|| HttpError::Malformed("bad chunk".into()))?;
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| HttpError::Malformed(format!("chunk size {size_line:?}")))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest
            .get(..size)
            .ok_or_else(|| HttpError::Malformed("short chunk".into()))?;
        out.push_str(chunk);
        body = rest.get(size..).unwrap_or("").trim_start_matches("\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding_is_twilio_style() {
        assert_eq!(form_encode("+14155550123"), "%2B14155550123");
        assert_eq!(form_encode("a b&c"), "a+b%26c");
        assert_eq!(form_encode("A-z_0.9*"), "A-z_0.9*");
        let params = [
            ("From".to_owned(), "+1 555".to_owned()),
            ("Body".to_owned(), "a=b&c=é".to_owned()),
        ];
        let body = form_body(&params);
        assert_eq!(body, "From=%2B1+555&Body=a%3Db%26c%3D%C3%A9");
        let back: Vec<(String, String)> = form_urlencoded::parse(body.as_bytes())
            .into_owned()
            .collect();
        assert_eq!(back, params);
    }

    #[test]
    fn parses_plain_and_chunked_responses() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\n\r\n<Response/>")
            .expect("parses");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("text/xml"));
        assert_eq!(r.body, "<Response/>");
        let r = parse_response(
            b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .expect("parses");
        assert_eq!(r.status, 403);
        assert_eq!(r.body, "abcde");
    }
}
