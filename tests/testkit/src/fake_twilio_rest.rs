//! A fake Twilio REST API (the Call resource) on loopback, built from Twilio's own OpenAPI
//! description (`specs/twilio-api-v2010-calls.json`, committed unchanged).
//!
//! - HTTP basic auth: the account SID + auth token, or an API key SID + secret.
//! - Every request is validated against the spec: an unknown field, a missing required
//!   field, a value of the wrong type or outside its enum gets a `400` with Twilio's error
//!   JSON (`code`, `message`, `more_info`, `status`).
//! - A created call follows a [`Lifecycle`] scripted per `To` number: it rings, then is
//!   answered (the signed voice webhook goes to the relay and a [`SimCaller`] drives the
//!   media stream), busy, unanswered after `Timeout`, failed, or answered by a machine
//!   (with the async AMD callback). Status callbacks are signed and posted in order (or
//!   in a scrambled order on request).
//! - A calls-per-second limit on creates, and `429`/`500` answers on demand.
//! - A request log with timestamps, for pacing assertions.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use tokio::sync::Notify;
use warp::Filter;
use warp::http::StatusCode;

use crate::conversation::Conversation;
use crate::sim_caller::{CallReport, CallerConfig, CallerError, LoadBalancer, SimCaller};

/// The committed copy of Twilio's Call resource spec.
pub fn default_spec_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("specs/twilio-api-v2010-calls.json")
}

/// The `/2010-04-01/Accounts/{AccountSid}/Calls.json` path.
const LIST_PATH: &str = "/2010-04-01/Accounts/{AccountSid}/Calls.json";
/// The `/2010-04-01/Accounts/{AccountSid}/Calls/{Sid}.json` path.
const ITEM_PATH: &str = "/2010-04-01/Accounts/{AccountSid}/Calls/{Sid}.json";

/// What happens to a call placed to one number.
#[derive(Debug, Clone)]
pub enum Lifecycle {
    /// Rings for `ring_ms`, is answered, gets the voice webhook and plays `script` on the
    /// media stream; `completed` when the stream ends.
    Answer { ring_ms: u64, script: Conversation },
    /// Answered by a machine: it plays `script` (its greeting) and then records, staying
    /// on the line until the call is ended for it; the async AMD callback says
    /// `answered_by` after `detect_ms` (a `machine_end_*` verdict becomes `machine_start`
    /// when the request asked for `Enable`, as with Twilio).
    Machine {
        ring_ms: u64,
        detect_ms: u64,
        answered_by: String,
        script: Conversation,
    },
    /// `busy` after `ring_ms`.
    Busy { ring_ms: u64 },
    /// Rings until the request's `Timeout` (seconds, default 60) scaled by
    /// [`FakeTwilioConfig::timeout_scale`], then `no-answer`.
    NoAnswer,
    /// `failed` with a SIP response code after `ring_ms`.
    Failed { ring_ms: u64, sip_code: u16 },
    /// The create itself is refused: `status` with Twilio `code` and `message`.
    Reject {
        status: u16,
        code: u32,
        message: String,
    },
    /// Rings until canceled (or `Timeout`).
    RingForever,
}

/// Where the simulated calls reach the relays.
#[derive(Debug, Clone)]
pub struct RelayTarget {
    /// The public base URL the relays are configured with.
    pub public_base: String,
    /// The relay addresses (round robin).
    pub relays: Arc<LoadBalancer>,
    /// Turns the sim caller's `<Connect action>` request on after an abnormal close.
    pub after_on_abnormal_close: bool,
}

/// How to run the fake.
#[derive(Debug, Clone)]
pub struct FakeTwilioConfig {
    pub account_sid: String,
    /// The auth token: basic-auth password for the account SID, and the signing key of
    /// every webhook and callback.
    pub auth_token: String,
    /// An API key (SID, secret) accepted as well.
    pub api_key: Option<(String, String)>,
    pub spec_path: PathBuf,
    /// Where answered calls go; `None`: no webhook, calls stay in progress until updated.
    pub relay: Option<RelayTarget>,
    /// Creates per rolling second before `429 / 20429`; `None`: unlimited.
    pub cps_limit: Option<u32>,
    /// Multiplies every `Timeout` (seconds) to get the simulated ring time, so tests can
    /// use Twilio-valid timeouts and still finish quickly.
    pub timeout_scale: f64,
    /// Lifecycle for numbers without their own.
    pub default_lifecycle: Lifecycle,
}

impl FakeTwilioConfig {
    /// A fake for `account_sid`/`auth_token` whose calls are answered and say nothing.
    pub fn new(account_sid: &str, auth_token: &str) -> Self {
        Self {
            account_sid: account_sid.to_owned(),
            auth_token: auth_token.to_owned(),
            api_key: None,
            spec_path: default_spec_path(),
            relay: None,
            cps_limit: None,
            timeout_scale: 0.01,
            default_lifecycle: Lifecycle::Answer {
                ring_ms: 50,
                script: Conversation::default(),
            },
        }
    }
}

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct LoggedRequest {
    /// Since the fake started.
    pub at: Duration,
    pub method: String,
    pub path: String,
    /// Form fields (body, or query for GET), in order.
    pub params: Vec<(String, String)>,
    /// The status the fake answered.
    pub status: u16,
}

impl LoggedRequest {
    /// First value of a form field.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether this is an accepted call create.
    pub fn is_create(&self) -> bool {
        self.method == "POST" && self.path.ends_with("/Calls.json")
    }
}

/// A callback the fake posted, and what the relay answered.
#[derive(Debug, Clone)]
pub struct PostedCallback {
    pub at: Duration,
    pub url: String,
    pub params: Vec<(String, String)>,
    /// HTTP status, or `None` when the request failed.
    pub status: Option<u16>,
}

impl PostedCallback {
    /// First value of a form field.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One call the fake created.
#[derive(Debug, Clone)]
pub struct FakeCall {
    pub sid: String,
    pub to: String,
    pub from: String,
    /// Current Twilio status.
    pub status: String,
    /// The create request's fields.
    pub params: Vec<(String, String)>,
    /// Updates received (`Status`, `Url`, `Twiml` …), in order.
    pub updates: Vec<Vec<(String, String)>>,
    /// The sim caller's report once its media stream ended.
    pub report: Option<Result<CallReport, String>>,
    pub answered_by: Option<String>,
    created: Instant,
    next_seq: u32,
}

impl FakeCall {
    fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Default)]
struct State {
    lifecycles: HashMap<String, Lifecycle>,
    calls: BTreeMap<String, FakeCall>,
    log: Vec<LoggedRequest>,
    callbacks: Vec<PostedCallback>,
    /// Answers forced on the next requests: (status, code).
    forced: VecDeque<(u16, u32)>,
    /// Creates in the last second (for the CPS limit).
    recent_creates: VecDeque<Instant>,
    /// Numbers whose status callbacks go out in reverse order.
    scrambled: HashSet<String>,
    /// Numbers whose status callbacks are never posted.
    silent: HashSet<String>,
    /// How long an accepted create waits before it is answered (the call exists at once).
    create_answer_delay: Duration,
    /// How long a call whose stream was lost (no action request) waits in progress for a
    /// REST redirect before it completes; zero: it completes at once.
    redirect_wait: Duration,
    live_streams: usize,
    max_live_streams: usize,
    sid_counter: u64,
}

struct Inner {
    cfg: FakeTwilioConfig,
    /// Where answered calls go (set after start: the relays start after control, which
    /// needs the fake's URL first).
    relay: Mutex<Option<RelayTarget>>,
    spec: Spec,
    started: Instant,
    state: Mutex<State>,
    changed: Notify,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn relay(&self) -> Option<RelayTarget> {
        self.relay
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The running fake; stops when dropped.
pub struct FakeTwilio {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeTwilio {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Why the fake could not start.
#[derive(Debug, thiserror::Error)]
pub enum FakeTwilioError {
    #[error("spec {path}: {message}")]
    Spec { path: String, message: String },
    #[error("bind: {0}")]
    Bind(String),
}

impl FakeTwilio {
    /// Starts the fake on a free loopback port.
    pub async fn start(cfg: FakeTwilioConfig) -> Result<Self, FakeTwilioError> {
        let spec = Spec::load(&cfg.spec_path)?;
        let inner = Arc::new(Inner {
            relay: Mutex::new(cfg.relay.clone()),
            cfg,
            spec,
            started: Instant::now(),
            state: Mutex::new(State::default()),
            changed: Notify::new(),
        });
        let routes = {
            let inner = inner.clone();
            warp::any()
                .and(warp::method())
                .and(warp::path::full())
                .and(warp::query::raw().or(warp::any().map(String::new)).unify())
                .and(warp::header::optional::<String>("authorization"))
                .and(warp::body::bytes())
                .then(
                    move |method, path: warp::path::FullPath, query, auth, body| {
                        let inner = inner.clone();
                        async move {
                            let (reply, delay) =
                                handle(inner, method, path.as_str(), query, auth, body);
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            reply
                        }
                    },
                )
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| FakeTwilioError::Bind(e.to_string()))?;
        let addr = listener
            .local_addr()
            .map_err(|e| FakeTwilioError::Bind(e.to_string()))?;
        let server = tokio::spawn(async move {
            warp::serve(routes).incoming(listener).run().await;
        });
        Ok(Self {
            addr,
            inner,
            server,
        })
    }

    /// What control's `TWILIO_API_BASE_URL` should be.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The account the fake serves (control's `TWILIO_ACCOUNT_SID`).
    pub fn account_sid(&self) -> &str {
        &self.inner.cfg.account_sid
    }

    /// The account's auth token (control's `TWILIO_AUTH_TOKEN`; it also signs callbacks).
    pub fn auth_token(&self) -> &str {
        &self.inner.cfg.auth_token
    }

    /// The variables that point control's dialer at this fake.
    pub fn control_env(&self) -> [(&'static str, String); 3] {
        [
            ("TWILIO_ACCOUNT_SID", self.account_sid().to_owned()),
            ("TWILIO_AUTH_TOKEN", self.auth_token().to_owned()),
            ("TWILIO_API_BASE_URL", self.base_url()),
        ]
    }

    /// Sends answered calls and callbacks to these relays from now on.
    pub fn set_relay(&self, target: RelayTarget) {
        *self
            .inner
            .relay
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(target);
    }

    /// Scripts the calls placed to `to`.
    pub fn script(&self, to: &str, lifecycle: Lifecycle) {
        self.inner
            .lock()
            .lifecycles
            .insert(to.to_owned(), lifecycle);
    }

    /// The next `count` requests (any kind) get `status` with Twilio `code` (e.g. 429 /
    /// 20429, or 500 / 20500).
    pub fn fail_next(&self, count: usize, status: u16, code: u32) {
        let mut s = self.inner.lock();
        for _ in 0..count {
            s.forced.push_back((status, code));
        }
    }

    /// Status callbacks of calls to `to` are posted newest first.
    pub fn scramble_callbacks(&self, to: &str) {
        self.inner.lock().scrambled.insert(to.to_owned());
    }

    /// Status callbacks of calls to `to` are never posted (the call is only visible by
    /// fetching or listing it).
    pub fn silence_callbacks(&self, to: &str) {
        self.inner.lock().silent.insert(to.to_owned());
    }

    /// From now on, a call whose media stream ends abnormally with no action request (the
    /// relay target's `after_on_abnormal_close` off) stays `in-progress` up to `wait` for a
    /// REST redirect (`Url`); one that comes is followed as Twilio would: a signed POST to
    /// the URL, and the `<Stream>` its TwiML names is played with the call's script.
    pub fn await_redirects(&self, wait: Duration) {
        self.inner.lock().redirect_wait = wait;
    }

    /// From now on, an accepted create creates the call at once but is answered only after
    /// `delay` (a client that dies meanwhile never learns the sid).
    pub fn delay_create_answers(&self, delay: Duration) {
        self.inner.lock().create_answer_delay = delay;
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.inner.lock().log.clone()
    }

    /// Every callback posted so far.
    pub fn callbacks(&self) -> Vec<PostedCallback> {
        self.inner.lock().callbacks.clone()
    }

    /// Every call created so far, by sid.
    pub fn calls(&self) -> Vec<FakeCall> {
        self.inner.lock().calls.values().cloned().collect()
    }

    /// One call.
    pub fn call(&self, sid: &str) -> Option<FakeCall> {
        self.inner.lock().calls.get(sid).cloned()
    }

    /// The most media streams open at once so far.
    pub fn max_live_streams(&self) -> usize {
        self.inner.lock().max_live_streams
    }

    /// Waits until `cond` holds over the calls (re-checked on every change), or `limit`.
    pub async fn wait_calls(
        &self,
        limit: Duration,
        mut cond: impl FnMut(&[FakeCall]) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.inner.changed.notified();
            if cond(&self.calls()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return cond(&self.calls());
            }
        }
    }
}

// === the spec ===

/// The parts of the OpenAPI description the validator needs.
#[derive(Debug)]
struct Spec {
    /// (path template, method) → the form schema (properties, required).
    forms: HashMap<(&'static str, &'static str), FormSchema>,
    /// (path template, method) → query parameters.
    queries: HashMap<(&'static str, &'static str), HashMap<String, Value>>,
}

#[derive(Debug, Default)]
struct FormSchema {
    properties: HashMap<String, Value>,
    required: Vec<String>,
}

impl Spec {
    fn load(path: &Path) -> Result<Self, FakeTwilioError> {
        let bad = |message: String| FakeTwilioError::Spec {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let doc: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let mut forms = HashMap::new();
        let mut queries = HashMap::new();
        for template in [LIST_PATH, ITEM_PATH] {
            let item = doc
                .pointer(&format!("/paths/{}", template.replace('/', "~1")))
                .ok_or_else(|| bad(format!("no path {template}")))?;
            for method in ["get", "post", "delete"] {
                let Some(op) = item.get(method) else { continue };
                let mut query = HashMap::new();
                for p in op["parameters"].as_array().into_iter().flatten() {
                    if let (true, Some(name)) = (p["in"] == "query", p["name"].as_str()) {
                        query.insert(name.to_owned(), p["schema"].clone());
                    }
                }
                queries.insert((template, method), query);
                let Some(schema) =
                    op.pointer("/requestBody/content/application~1x-www-form-urlencoded/schema")
                else {
                    continue;
                };
                let mut form = FormSchema::default();
                for (name, prop) in schema["properties"].as_object().into_iter().flatten() {
                    form.properties
                        .insert(name.clone(), resolve(&doc, prop).clone());
                }
                form.required = schema["required"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect();
                forms.insert((template, method), form);
            }
        }
        if !forms.contains_key(&(LIST_PATH, "post")) {
            return Err(bad("no create operation".into()));
        }
        Ok(Spec { forms, queries })
    }
}

/// Follows a local `$ref`.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => r
            .strip_prefix('#')
            .and_then(|p| doc.pointer(p))
            .unwrap_or(schema),
        None => schema,
    }
}

/// Checks one value against its property schema; the reason when it does not fit.
fn check_value(schema: &Value, value: &str) -> Result<(), String> {
    if let Some(options) = schema["enum"].as_array()
        && !options.iter().any(|o| o.as_str() == Some(value))
    {
        return Err(format!("is not one of {options:?}"));
    }
    match schema["type"].as_str() {
        Some("integer") if value.parse::<i64>().is_err() => Err("is not an integer".into()),
        Some("boolean") if value != "true" && value != "false" => Err("is not a boolean".into()),
        _ => match (schema["format"].as_str(), schema.get("pattern")) {
            (Some("uri"), _)
                if !(value.starts_with("http://") || value.starts_with("https://")) =>
            {
                Err("is not an absolute http(s) URL".into())
            }
            _ => {
                if let (Some(min), Some(max)) =
                    (schema["minLength"].as_u64(), schema["maxLength"].as_u64())
                {
                    let len = value.chars().count() as u64;
                    if len < min || len > max {
                        return Err(format!("must be {min}..={max} characters"));
                    }
                }
                Ok(())
            }
        },
    }
}

/// Validates a form against a schema; the Twilio error on the first problem.
fn validate_form(schema: &FormSchema, params: &[(String, String)]) -> Result<(), ApiError> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (name, value) in params {
        let Some(prop) = schema.properties.get(name) else {
            return Err(ApiError::bad(20001, format!("Unknown parameter: {name}")));
        };
        *seen.entry(name).or_default() += 1;
        let item = if prop["type"] == "array" {
            &prop["items"]
        } else {
            if seen[name.as_str()] > 1 {
                return Err(ApiError::bad(
                    20001,
                    format!("Parameter {name} given more than once"),
                ));
            }
            prop
        };
        check_value(item, value)
            .map_err(|why| ApiError::bad(21200, format!("Invalid {name}: '{value}' {why}")))?;
    }
    for name in &schema.required {
        if !seen.contains_key(name.as_str()) {
            let code = match name.as_str() {
                "To" => 21201,
                "From" => 21213,
                _ => 20001,
            };
            return Err(ApiError::bad(
                code,
                format!("Missing required parameter {name} in the post body"),
            ));
        }
    }
    Ok(())
}

// === HTTP ===

#[derive(Debug)]
struct ApiError {
    status: u16,
    code: u32,
    message: String,
}

impl ApiError {
    fn bad(code: u32, message: String) -> Self {
        ApiError {
            status: 400,
            code,
            message,
        }
    }

    fn reply(&self) -> (u16, Value) {
        (
            self.status,
            json!({
                "code": self.code,
                "message": self.message,
                "more_info": format!("https://www.twilio.com/docs/errors/{}", self.code),
                "status": self.status,
            }),
        )
    }
}

fn handle(
    inner: Arc<Inner>,
    method: warp::http::Method,
    path: &str,
    query: String,
    auth: Option<String>,
    body: bytes::Bytes,
) -> (warp::reply::WithStatus<warp::reply::Json>, Duration) {
    let at = inner.started.elapsed();
    let method = method.as_str().to_owned();
    let params: Vec<(String, String)> = if method == "GET" {
        serde_urlencoded::from_str(&query).unwrap_or_default()
    } else {
        serde_urlencoded::from_bytes(&body).unwrap_or_default()
    };
    let (status, value) = match route(&inner, &method, path, &params, auth.as_deref()) {
        Ok((status, value)) => (status, value),
        Err(err) => err.reply(),
    };
    let created = method == "POST" && path.ends_with("/Calls.json") && status == 201;
    let delay = {
        let mut s = inner.lock();
        s.log.push(LoggedRequest {
            at,
            method,
            path: path.to_owned(),
            params,
            status,
        });
        if created {
            s.create_answer_delay
        } else {
            Duration::ZERO
        }
    };
    inner.changed.notify_waiters();
    (
        warp::reply::with_status(
            warp::reply::json(&value),
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        ),
        delay,
    )
}

fn check_auth(cfg: &FakeTwilioConfig, header: Option<&str>) -> Result<(), ApiError> {
    let unauthorized = || ApiError {
        status: 401,
        code: 20003,
        message: "Authenticate".into(),
    };
    let encoded = header
        .and_then(|h| h.strip_prefix("Basic "))
        .ok_or_else(unauthorized)?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| unauthorized())?;
    let text = String::from_utf8(decoded).map_err(|_| unauthorized())?;
    let (user, password) = text.split_once(':').ok_or_else(unauthorized)?;
    let ok = (user == cfg.account_sid && password == cfg.auth_token)
        || cfg
            .api_key
            .as_ref()
            .is_some_and(|(sid, secret)| user == sid && password == secret);
    if ok { Ok(()) } else { Err(unauthorized()) }
}

fn route(
    inner: &Arc<Inner>,
    method: &str,
    path: &str,
    params: &[(String, String)],
    auth: Option<&str>,
) -> Result<(u16, Value), ApiError> {
    check_auth(&inner.cfg, auth)?;
    let not_found = || ApiError {
        status: 404,
        code: 20404,
        message: format!("The requested resource {path} was not found"),
    };
    let rest = path
        .strip_prefix("/2010-04-01/Accounts/")
        .ok_or_else(not_found)?;
    let (account, rest) = rest.split_once('/').ok_or_else(not_found)?;
    if account != inner.cfg.account_sid {
        return Err(not_found());
    }
    if let Some((status, code)) = inner.lock().forced.pop_front() {
        return Err(ApiError {
            status,
            code,
            message: format!("Forced by the test ({status})"),
        });
    }
    if rest == "Calls.json" {
        match method {
            "POST" => {
                validate_form(&inner.spec.forms[&(LIST_PATH, "post")], params)?;
                create(inner, params)
            }
            "GET" => {
                check_query(&inner.spec, LIST_PATH, params)?;
                Ok((200, list(inner, params)))
            }
            _ => Err(not_found()),
        }
    } else if let Some(sid) = rest
        .strip_prefix("Calls/")
        .and_then(|s| s.strip_suffix(".json"))
    {
        match method {
            "POST" => {
                validate_form(&inner.spec.forms[&(ITEM_PATH, "post")], params)?;
                update(inner, sid, params)
            }
            "GET" => {
                let s = inner.lock();
                let call = s.calls.get(sid).ok_or_else(not_found)?;
                Ok((200, call_json(&inner.cfg, call)))
            }
            "DELETE" => {
                inner.lock().calls.remove(sid).ok_or_else(not_found)?;
                Ok((204, Value::Null))
            }
            _ => Err(not_found()),
        }
    } else {
        Err(not_found())
    }
}

fn check_query(
    spec: &Spec,
    template: &'static str,
    params: &[(String, String)],
) -> Result<(), ApiError> {
    let known = &spec.queries[&(template, "get")];
    for (name, value) in params {
        let schema = known
            .get(name)
            .ok_or_else(|| ApiError::bad(20001, format!("Unknown parameter: {name}")))?;
        check_value(schema, value)
            .map_err(|why| ApiError::bad(21200, format!("Invalid {name}: '{value}' {why}")))?;
    }
    Ok(())
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn call_json(cfg: &FakeTwilioConfig, call: &FakeCall) -> Value {
    json!({
        "sid": call.sid,
        "account_sid": cfg.account_sid,
        "to": call.to,
        "from": call.from,
        "status": call.status,
        "direction": "outbound-api",
        "answered_by": call.answered_by,
        "api_version": "2010-04-01",
        "uri": format!("/2010-04-01/Accounts/{}/Calls/{}.json", cfg.account_sid, call.sid),
    })
}

fn create(inner: &Arc<Inner>, params: &[(String, String)]) -> Result<(u16, Value), ApiError> {
    // Twilio needs one source of TwiML; the spec cannot say "one of".
    if ["Url", "Twiml", "ApplicationSid"]
        .iter()
        .all(|f| param(params, f).is_none())
    {
        return Err(ApiError::bad(
            21205,
            "Url, Twiml or ApplicationSid is required".into(),
        ));
    }
    let to = param(params, "To").unwrap_or_default().to_owned();
    let from = param(params, "From").unwrap_or_default().to_owned();
    let now = Instant::now();
    let lifecycle;
    let sid;
    {
        let mut s = inner.lock();
        if let Some(limit) = inner.cfg.cps_limit {
            while s
                .recent_creates
                .front()
                .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
            {
                s.recent_creates.pop_front();
            }
            if s.recent_creates.len() >= limit as usize {
                return Err(ApiError {
                    status: 429,
                    code: 20429,
                    message: "Too Many Requests".into(),
                });
            }
        }
        lifecycle = s
            .lifecycles
            .get(&to)
            .cloned()
            .unwrap_or_else(|| inner.cfg.default_lifecycle.clone());
        if let Lifecycle::Reject {
            status,
            code,
            message,
        } = &lifecycle
        {
            return Err(ApiError {
                status: *status,
                code: *code,
                message: message.clone(),
            });
        }
        s.recent_creates.push_back(now);
        s.sid_counter += 1;
        sid = format!("CA{:032x}", s.sid_counter);
        let call = FakeCall {
            sid: sid.clone(),
            to,
            from,
            status: "queued".into(),
            params: params.to_vec(),
            updates: Vec::new(),
            report: None,
            answered_by: None,
            created: now,
            next_seq: 0,
        };
        s.calls.insert(sid.clone(), call);
    }
    let value = {
        let s = inner.lock();
        call_json(&inner.cfg, &s.calls[&sid])
    };
    tokio::spawn(run_call(inner.clone(), sid, lifecycle));
    Ok((201, value))
}

fn list(inner: &Arc<Inner>, params: &[(String, String)]) -> Value {
    let s = inner.lock();
    let calls: Vec<Value> = s
        .calls
        .values()
        .filter(|c| param(params, "To").is_none_or(|to| c.to == to))
        .filter(|c| param(params, "Status").is_none_or(|st| c.status == st))
        .map(|c| call_json(&inner.cfg, c))
        .collect();
    json!({ "calls": calls, "page": 0, "page_size": calls.len(), "next_page_uri": null })
}

fn update(
    inner: &Arc<Inner>,
    sid: &str,
    params: &[(String, String)],
) -> Result<(u16, Value), ApiError> {
    let mut s = inner.lock();
    let call = s.calls.get_mut(sid).ok_or_else(|| ApiError {
        status: 404,
        code: 20404,
        message: format!("The requested resource Calls/{sid}.json was not found"),
    })?;
    call.updates.push(params.to_vec());
    match param(params, "Status") {
        Some("canceled") if matches!(call.status.as_str(), "queued" | "ringing") => {
            call.status = "canceled".into();
        }
        Some("completed") if call.status == "in-progress" => call.status = "completed".into(),
        Some(_) => {}
        None if (param(params, "Url").is_some() || param(params, "Twiml").is_some())
            && call.status != "in-progress" =>
        {
            return Err(ApiError::bad(
                21220,
                "Call is not in-progress. Cannot redirect.".into(),
            ));
        }
        None => {}
    }
    let value = call_json(&inner.cfg, call);
    drop(s);
    inner.changed.notify_waiters();
    Ok((200, value))
}

// === the simulated call ===

fn status_of(inner: &Inner, sid: &str) -> String {
    inner
        .lock()
        .calls
        .get(sid)
        .map(|c| c.status.clone())
        .unwrap_or_default()
}

/// Sets the status unless the call already ended (a cancel or hang-up won); returns
/// whether it was set.
fn set_status(inner: &Inner, sid: &str, from: &[&str], to: &str) -> bool {
    let mut s = inner.lock();
    let Some(call) = s.calls.get_mut(sid) else {
        return false;
    };
    if !from.contains(&call.status.as_str()) {
        return false;
    }
    call.status = to.to_owned();
    drop(s);
    inner.changed.notify_waiters();
    true
}

/// Sleeps `ms`, waking early when the call's status leaves `status`; whether it stayed.
async fn ring(inner: &Inner, sid: &str, ms: u64, status: &str) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
    loop {
        let notified = inner.changed.notified();
        if status_of(inner, sid) != status {
            return false;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return status_of(inner, sid) == status;
        }
    }
}

async fn run_call(inner: Arc<Inner>, sid: String, lifecycle: Lifecycle) {
    let mut pending = Vec::new();
    let scrambled = {
        let s = inner.lock();
        s.calls
            .get(&sid)
            .is_some_and(|c| s.scrambled.contains(&c.to))
    };
    // `initiated` right away; Twilio names the event, the status is still `queued`.
    pending.push(callback_params(&inner, &sid, "initiated", &[]));
    set_status(&inner, &sid, &["queued"], "ringing");
    pending.push(callback_params(&inner, &sid, "ringing", &[]));
    if !scrambled {
        flush(&inner, &sid, &mut pending).await;
    }
    let timeout_ms = {
        let s = inner.lock();
        let secs: f64 = s
            .calls
            .get(&sid)
            .and_then(|c| c.param("Timeout"))
            .and_then(|t| t.parse().ok())
            .unwrap_or(60.0);
        (secs * inner.cfg.timeout_scale * 1000.0) as u64
    };
    let (ring_ms, answer) = match &lifecycle {
        Lifecycle::Answer { ring_ms, .. } | Lifecycle::Machine { ring_ms, .. } => (*ring_ms, true),
        Lifecycle::Busy { ring_ms } | Lifecycle::Failed { ring_ms, .. } => (*ring_ms, false),
        Lifecycle::NoAnswer | Lifecycle::RingForever | Lifecycle::Reject { .. } => {
            (timeout_ms, false)
        }
    };
    let still_ringing = ring(&inner, &sid, ring_ms.min(timeout_ms.max(1)), "ringing").await;
    if !still_ringing {
        // Canceled (or completed) by an update meanwhile.
        let status = status_of(&inner, &sid);
        pending.push(callback_params(
            &inner,
            &sid,
            &status,
            &[("CallDuration", "0")],
        ));
        flush(&inner, &sid, &mut pending).await;
        return;
    }
    if !answer || ring_ms > timeout_ms {
        let (status, extra): (&str, Vec<(&str, String)>) = match &lifecycle {
            Lifecycle::Busy { .. } => ("busy", vec![("SipResponseCode", "486".into())]),
            Lifecycle::Failed { sip_code, .. } => {
                ("failed", vec![("SipResponseCode", sip_code.to_string())])
            }
            _ => ("no-answer", vec![("SipResponseCode", "487".into())]),
        };
        set_status(&inner, &sid, &["ringing"], status);
        let mut extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
        extra.push(("CallDuration", "0"));
        pending.push(callback_params(&inner, &sid, status, &extra));
        flush(&inner, &sid, &mut pending).await;
        return;
    }
    set_status(&inner, &sid, &["ringing"], "in-progress");
    pending.push(callback_params(&inner, &sid, "in-progress", &[]));
    if !scrambled {
        flush(&inner, &sid, &mut pending).await;
    }
    let answered_at = Instant::now();
    let (script, amd) = match lifecycle {
        Lifecycle::Answer { script, .. } => (script, None),
        Lifecycle::Machine {
            script,
            detect_ms,
            answered_by,
            ..
        } => (script, Some((detect_ms, answered_by))),
        _ => (Conversation::default(), None),
    };
    // A person (or a verdict Twilio could not reach) talks and hangs up like any caller.
    let machine = amd
        .as_ref()
        .is_some_and(|(_, v)| v.starts_with("machine") || v == "fax");
    if let Some((detect_ms, answered_by)) = amd {
        let inner = inner.clone();
        let sid = sid.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(detect_ms)).await;
            amd_callback(&inner, &sid, &answered_by, detect_ms).await;
        });
    }
    let mut report = media(&inner, &sid, script.clone(), machine).await;
    // A lost stream with no action request: Twilio has nothing to run until a redirect.
    while let Ok(r) = &report {
        let lost = r.legs.last().is_some_and(|l| l.closed_by.is_abnormal())
            && r.after.len() < r.legs.len();
        if !lost {
            break;
        }
        let Some(url) = wait_for_redirect(&inner, &sid).await else {
            break;
        };
        report = follow_redirect(&inner, &sid, &url, script.clone(), machine).await;
    }
    // The stream is over: Twilio hangs up unless the call was redirected elsewhere.
    set_status(&inner, &sid, &["in-progress"], "completed");
    {
        let mut s = inner.lock();
        if let Some(call) = s.calls.get_mut(&sid) {
            call.report = Some(report.map_err(|e| e.to_string()));
        }
    }
    let duration = answered_at.elapsed().as_secs().max(1).to_string();
    pending.push(callback_params(
        &inner,
        &sid,
        "completed",
        &[("CallDuration", duration.as_str())],
    ));
    flush(&inner, &sid, &mut pending).await;
}

/// The `Url` of a redirect that arrives within the redirect wait while the call is still
/// in progress.
async fn wait_for_redirect(inner: &Arc<Inner>, sid: &str) -> Option<String> {
    let (wait, seen) = {
        let s = inner.lock();
        (
            s.redirect_wait,
            s.calls.get(sid).map_or(0, |c| c.updates.len()),
        )
    };
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let notified = inner.changed.notified();
        {
            let s = inner.lock();
            let call = s.calls.get(sid)?;
            if call.status != "in-progress" {
                return None;
            }
            let redirect = call
                .updates
                .iter()
                .skip(seen)
                .find_map(|u| u.iter().find(|(k, _)| k == "Url").map(|(_, v)| v.clone()));
            if redirect.is_some() {
                return redirect;
            }
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return None;
        }
    }
}

/// Follows a redirect: the signed POST to `url` (on the next relay), then the stream its
/// TwiML names, with a fresh run of `script`.
async fn follow_redirect(
    inner: &Arc<Inner>,
    sid: &str,
    url: &str,
    script: Conversation,
    machine: bool,
) -> Result<CallReport, CallerError> {
    let cfg = caller_config(inner, sid, script.clone(), machine)?;
    let caller = SimCaller::new(cfg);
    let exchange = caller
        .post_signed(url, &caller.cfg.call_params("in-progress"))
        .await?;
    let mut report = CallReport {
        webhook: exchange.clone(),
        legs: Vec::new(),
        after: Vec::new(),
    };
    let Some(twiml) = exchange.twiml else {
        return Ok(report);
    };
    let Some(stream_url) = twiml.stream_url.clone() else {
        return Ok(report);
    };
    let (_commands_tx, mut commands) = tokio::sync::mpsc::channel(1);
    let live = crate::sim_caller::LiveStats::default();
    let mut state = crate::sim_caller::ScriptState::new(&script);
    inner.lock().live_streams += 1;
    let leg = caller
        .stream(
            &stream_url,
            &twiml.parameters,
            &mut state,
            &mut commands,
            &live,
        )
        .await;
    inner.lock().live_streams -= 1;
    report.legs.push(leg?);
    Ok(report)
}

/// A sim caller's settings for one of the fake's calls (to the relay target). A `machine`
/// plays its greeting (`script`) and then records: it stays on the line until the call is
/// ended for it.
fn caller_config(
    inner: &Arc<Inner>,
    sid: &str,
    script: Conversation,
    machine: bool,
) -> Result<CallerConfig, CallerError> {
    let Some(target) = &inner.relay() else {
        return Err(CallerError::Config("no relay configured".into()));
    };
    let (url, from, to) = {
        let s = inner.lock();
        let call = s
            .calls
            .get(sid)
            .ok_or_else(|| CallerError::Config("call vanished".into()))?;
        (
            call.param("Url").unwrap_or_default().to_owned(),
            call.from.clone(),
            call.to.clone(),
        )
    };
    let call_id = url
        .split_once("callId=")
        .map(|(_, id)| id.split('&').next().unwrap_or(id).to_owned());
    let mut cfg = CallerConfig::new(
        &target.public_base,
        target.relays.pick()?,
        Some(&inner.cfg.auth_token),
    );
    cfg.relays = target.relays.clone();
    cfg.call_id = call_id;
    cfg.call_sid = sid.to_owned();
    cfg.account_sid = inner.cfg.account_sid.clone();
    // Twilio's From/To of an outbound call: our number calls theirs.
    cfg.from = from;
    cfg.to = to;
    cfg.direction = "outbound-api".into();
    cfg.script = script;
    cfg.playback_speed = 4.0;
    cfg.follow_streams = 3;
    cfg.after_on_abnormal_close = target.after_on_abnormal_close;
    cfg.max_call = Duration::from_secs(120);
    if machine {
        cfg.hang_up_at_end = false;
        cfg.max_call = Duration::from_secs(60);
    }
    Ok(cfg)
}

/// Runs the voice webhook and media stream with a sim caller; `Ok` with nothing to say
/// when there is no relay.
async fn media(
    inner: &Arc<Inner>,
    sid: &str,
    script: Conversation,
    machine: bool,
) -> Result<CallReport, CallerError> {
    let Some(target) = &inner.relay() else {
        return Err(CallerError::Config("no relay configured".into()));
    };
    let url = {
        let s = inner.lock();
        let call = s
            .calls
            .get(sid)
            .ok_or_else(|| CallerError::Config("call vanished".into()))?;
        call.param("Url").unwrap_or_default().to_owned()
    };
    if !url.starts_with(&format!("{}/api/twilio/voice", target.public_base)) {
        return Err(CallerError::Config(format!(
            "Url {url} is not the relay's voice webhook"
        )));
    }
    let cfg = caller_config(inner, sid, script, machine)?;
    {
        let mut s = inner.lock();
        s.live_streams += 1;
        s.max_live_streams = s.max_live_streams.max(s.live_streams);
    }
    let caller = SimCaller::new(cfg).start();
    // A REST update (hang-up, cancel) ends the media the way Twilio would.
    let handle = caller;
    let result = loop {
        let notified = inner.changed.notified();
        if status_of(inner, sid) != "in-progress" {
            handle.command(crate::sim_caller::CallerCommand::Stop).await;
            break handle.join().await;
        }
        if handle.commands.is_closed() {
            break handle.join().await;
        }
        tokio::select! {
            () = notified => {}
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    };
    inner.lock().live_streams -= 1;
    result
}

fn callback_params(
    inner: &Inner,
    sid: &str,
    status: &str,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut s = inner.lock();
    let Some(call) = s.calls.get_mut(sid) else {
        return Vec::new();
    };
    let seq = call.next_seq;
    call.next_seq += 1;
    let elapsed_ms = call.created.elapsed().as_millis();
    let mut params: Vec<(String, String)> = [
        ("AccountSid", inner.cfg.account_sid.as_str()),
        ("ApiVersion", "2010-04-01"),
        ("CallSid", sid),
        ("CallStatus", status),
        ("CallbackSource", "call-progress-events"),
        ("Direction", "outbound-api"),
        ("From", call.from.as_str()),
        ("To", call.to.as_str()),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    params.push(("SequenceNumber".into(), seq.to_string()));
    params.push(("Timestamp".into(), format!("+{elapsed_ms}ms")));
    for (k, v) in extra {
        params.push(((*k).to_owned(), (*v).to_owned()));
    }
    params
}

/// Posts the pending status callbacks whose event the create asked for; newest first for
/// scrambled numbers.
async fn flush(inner: &Arc<Inner>, sid: &str, pending: &mut Vec<Vec<(String, String)>>) {
    let (url, events, scrambled) = {
        let s = inner.lock();
        let Some(call) = s.calls.get(sid) else { return };
        if s.silent.contains(&call.to) {
            pending.clear();
            return;
        }
        let events: Vec<String> = call
            .params
            .iter()
            .filter(|(k, _)| k == "StatusCallbackEvent")
            .map(|(_, v)| v.clone())
            .collect();
        (
            call.param("StatusCallback").map(str::to_owned),
            events,
            s.scrambled.contains(&call.to),
        )
    };
    let mut batch: Vec<_> = std::mem::take(pending);
    let Some(url) = url else { return };
    if scrambled {
        batch.reverse();
    }
    for params in batch {
        let status = param(&params, "CallStatus").unwrap_or_default();
        let event = match status {
            "initiated" => "initiated",
            "ringing" => "ringing",
            "in-progress" => "answered",
            _ => "completed",
        };
        // Only `completed` when the create named no events (Twilio's rule).
        let wanted = if events.is_empty() {
            event == "completed"
        } else {
            events.iter().any(|e| e == event)
        };
        if wanted {
            post(inner, &url, params).await;
        }
    }
}

async fn amd_callback(inner: &Arc<Inner>, sid: &str, mut answered_by: &str, detect_ms: u64) {
    let url = {
        let mut s = inner.lock();
        let Some(call) = s.calls.get_mut(sid) else {
            return;
        };
        // `Enable` answers as soon as it can tell: a machine is `machine_start`, never
        // one of the `machine_end_*` verdicts that wait for the greeting's end.
        if call.param("MachineDetection") == Some("Enable")
            && answered_by.starts_with("machine_end_")
        {
            answered_by = "machine_start";
        }
        call.answered_by = Some(answered_by.to_owned());
        if call.param("AsyncAmd") != Some("true") {
            return;
        }
        call.param("AsyncAmdStatusCallback").map(str::to_owned)
    };
    let Some(url) = url else { return };
    let params: Vec<(String, String)> = [
        ("AccountSid", inner.cfg.account_sid.as_str()),
        ("CallSid", sid),
        ("AnsweredBy", answered_by),
        ("MachineDetectionDuration", detect_ms.to_string().as_str()),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    post(inner, &url, params).await;
}

/// Posts one signed callback to the relays (like Twilio, to the public URL).
async fn post(inner: &Arc<Inner>, url: &str, params: Vec<(String, String)>) {
    let at = inner.started.elapsed();
    let status = match &inner.relay() {
        Some(target) => {
            let mut cfg = match target.relays.pick() {
                Ok(addr) => {
                    CallerConfig::new(&target.public_base, addr, Some(&inner.cfg.auth_token))
                }
                Err(_) => return,
            };
            cfg.relays = target.relays.clone();
            cfg.io_timeout = Duration::from_secs(5);
            SimCaller::new(cfg)
                .post_signed(url, &params)
                .await
                .ok()
                .map(|x| x.response.status)
        }
        None => None,
    };
    inner.lock().callbacks.push(PostedCallback {
        at,
        url: url.to_owned(),
        params,
        status,
    });
    inner.changed.notify_waiters();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        Spec::load(&default_spec_path()).expect("the committed spec loads")
    }

    fn form(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn create_form_is_checked_against_the_spec() {
        let spec = spec();
        let create = &spec.forms[&(LIST_PATH, "post")];
        let ok = form(&[
            ("To", "+14155550123"),
            ("From", "+14155550100"),
            ("Url", "https://relay.example.com/api/twilio/voice?callId=x"),
            ("StatusCallbackEvent", "initiated"),
            ("StatusCallbackEvent", "answered"),
            ("Timeout", "20"),
            ("AsyncAmdStatusCallbackMethod", "POST"),
        ]);
        validate_form(create, &ok).expect("a valid create");
        let unknown = form(&[("To", "+1"), ("From", "+2"), ("Colour", "red")]);
        let err = validate_form(create, &unknown).expect_err("unknown field");
        assert_eq!((err.status, err.code), (400, 20001));
        assert!(err.message.contains("Colour"), "{}", err.message);
        let missing = form(&[("From", "+2"), ("Url", "https://x.test/")]);
        assert_eq!(
            validate_form(create, &missing).expect_err("no To").code,
            21201
        );
        let not_int = form(&[("To", "+1"), ("From", "+2"), ("Timeout", "soon")]);
        assert_eq!(
            validate_form(create, &not_int).expect_err("bad int").code,
            21200
        );
        let twice = form(&[("To", "+1"), ("To", "+3"), ("From", "+2")]);
        assert_eq!(
            validate_form(create, &twice).expect_err("repeated").code,
            20001
        );
        let bad_enum = form(&[
            ("To", "+1"),
            ("From", "+2"),
            ("StatusCallbackMethod", "PUT"),
        ]);
        assert_eq!(
            validate_form(create, &bad_enum).expect_err("enum").code,
            21200
        );
    }

    #[test]
    fn update_status_uses_the_referenced_enum() {
        let spec = spec();
        let update = &spec.forms[&(ITEM_PATH, "post")];
        validate_form(update, &form(&[("Status", "canceled")])).expect("cancel is valid");
        let err = validate_form(update, &form(&[("Status", "ringing")]))
            .expect_err("not an update status");
        assert_eq!(err.status, 400);
        assert!(validate_form(update, &form(&[("To", "+1")])).is_err());
    }
}
