//! Token-record decoding: what `DynamoTokenStore` makes of a DynamoDB item (through its public
//! `record` / `insert`, over the real SDK, with the HTTP layer answered in memory), and what the
//! cleanup makes of an Authorizations stream batch (`stream::removed_records`).

use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use arbitrary::{Result, Unstructured};
use aws_lambda_events::event::dynamodb::Event;
use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::config::{
    BehaviorVersion, Credentials, Region, StalledStreamProtectionConfig,
};
use aws_smithy_http_client::test_util::infallible_client_fn;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use iam_broker_aws::DynamoTokenStore;
use iam_broker_aws::dynamodb::token_attributes as ta;
use iam_broker_aws::stream::removed_records;
use iam_broker_kernel::allowance::RoleArn;
use iam_broker_kernel::ports::{StoreError, TokenStore};
use iam_broker_kernel::{TokenHash, TokenRecord};
use serde_json::{Map, Value, json};

use crate::json;

const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
const TABLE: &str = "Authorizations";

/// The in-memory wire: what the next `GetItem` answers, and the last `PutItem` body.
#[derive(Default)]
struct Wire {
    get_item: Vec<u8>,
    put_item: Option<Vec<u8>>,
}

/// One store over the real SDK whose HTTP calls are answered from [`Wire`], and a runtime to
/// drive it. Built once per process; calls are serialised by the mutex.
struct Harness {
    wire: Arc<Mutex<Wire>>,
    store: DynamoTokenStore,
    runtime: tokio::runtime::Runtime,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn harness() -> &'static Mutex<Harness> {
    static HARNESS: OnceLock<Mutex<Harness>> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let wire = Arc::new(Mutex::new(Wire::default()));
        let answering = Arc::clone(&wire);
        let http = infallible_client_fn(move |request: http::Request<_>| {
            let target = request
                .headers()
                .get("x-amz-target")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let mut wire = lock(&answering);
            let body = if target.ends_with(".PutItem") {
                wire.put_item = request.body().bytes().map(<[u8]>::to_vec);
                b"{}".to_vec()
            } else {
                wire.get_item.clone()
            };
            let mut response = http::Response::new(body);
            response.headers_mut().insert(
                "content-type",
                http::HeaderValue::from_static("application/x-amz-json-1.0"),
            );
            response
        });
        let config = aws_sdk_dynamodb::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::for_tests())
            .endpoint_url("http://dynamodb.invalid")
            .retry_config(RetryConfig::disabled())
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
            .http_client(http)
            .build();
        let store = DynamoTokenStore::new(aws_sdk_dynamodb::Client::from_conf(config), TABLE);
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => panic!("no tokio runtime for the record target: {e}"),
        };
        Mutex::new(Harness {
            wire,
            store,
            runtime,
        })
    })
}

impl Harness {
    /// `DynamoTokenStore::record` when `GetItem` answers `body`.
    fn read(&self, body: Vec<u8>) -> std::result::Result<Option<TokenRecord>, StoreError> {
        lock(&self.wire).get_item = body;
        let hash = TokenHash::parse(HASH);
        match hash {
            Some(hash) => self.runtime.block_on(self.store.record(&hash)),
            None => panic!("the target's own hash does not parse"),
        }
    }

    /// The item `DynamoTokenStore::insert` writes for `record`.
    fn write(&self, record: &TokenRecord) -> Map<String, Value> {
        lock(&self.wire).put_item = None;
        if let Err(e) = self.runtime.block_on(self.store.insert(record)) {
            panic!("insert failed against an answering table: {e}");
        }
        let body = lock(&self.wire).put_item.take().unwrap_or_default();
        let request: Value = serde_json::from_slice(&body).unwrap_or_default();
        match request.get("Item") {
            Some(Value::Object(item)) => item.clone(),
            _ => panic!("PutItem without an Item: {request}"),
        }
    }
}

/// Attribute names: the record's and some others.
const NAMES: &[&str] = &[
    ta::TOKEN_HASH,
    ta::NAMESPACE,
    ta::SERVICE_ACCOUNT,
    ta::ROLE_ARN,
    ta::SECRET_NAME,
    ta::POD_NAME,
    ta::CREATED_AT,
    ta::LAST_USED,
    ta::EXPIRES,
    "retracted_at",
    "extra",
];

/// String values: valid and nearly valid ones for each attribute.
const STRINGS: &[&str] = &[
    HASH,
    "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08",
    "abc",
    "",
    "team-a",
    "app",
    "*",
    "arn:aws:iam::123456789012:role/iam-broker/s3_reader",
    "arn:aws:iam::123456789012:role/x",
    "arn:aws:iam::12345678901:role/x",
    "arn:aws:s3:::bucket",
    "arn:aws-cn:iam::123456789012:role/a/b/c",
    "iam-broker-token-9f86d081884c7d65",
    "web-",
];

/// Number values: valid, huge, negative, fractional, not numbers.
const NUMBERS: &[&str] = &[
    "1700000000",
    "0",
    "-1",
    "9223372036854775807",
    "9223372036854775808",
    "1e3",
    "1.5",
    "abc",
    "",
    "01",
    "+5",
];

/// One in `n` (never on exhausted input, which reads as 0).
fn one_in(u: &mut Unstructured<'_>, n: u8) -> Result<bool> {
    Ok(u.int_in_range(0..=n - 1)? == n - 1)
}

/// A well-typed attribute with a value a real record has.
fn valid_attribute(u: &mut Unstructured<'_>, name: &str) -> Result<Value> {
    let arns = [
        "arn:aws:iam::123456789012:role/iam-broker/s3_reader",
        "arn:aws-cn:iam::123456789012:role/a/b/c",
    ];
    Ok(match name {
        ta::TOKEN_HASH => json!({ "S": HASH }),
        ta::ROLE_ARN => json!({ "S": *u.choose(&arns)? }),
        ta::CREATED_AT | ta::LAST_USED | ta::EXPIRES | "retracted_at" => {
            json!({ "N": u.arbitrary::<i64>()?.to_string() })
        }
        _ => {
            json!({ "S": *u.choose(&["team-a", "app", "web-", "iam-broker-token-9f86d081884c7d65"])? })
        }
    })
}

/// One DynamoDB attribute value as JSON: mostly of the type the record uses for `name`.
fn attribute(u: &mut Unstructured<'_>, name: &str, depth: u8) -> Result<Value> {
    let numeric = [ta::CREATED_AT, ta::LAST_USED, ta::EXPIRES, "retracted_at"].contains(&name);
    let s = |u: &mut Unstructured<'_>| -> Result<Value> {
        Ok(json!({ "S": json::string(u, STRINGS)? }))
    };
    let n = |u: &mut Unstructured<'_>| -> Result<Value> {
        Ok(json!({ "N": json::string(u, NUMBERS)? }))
    };
    if u.ratio(3u8, 4u8)? {
        return if numeric { n(u) } else { s(u) };
    }
    Ok(match u.choose_index(if depth == 0 { 6 } else { 8 })? {
        0 => s(u)?,
        1 => n(u)?,
        2 => json!({ "BOOL": u.arbitrary::<bool>()? }),
        3 => json!({ "NULL": true }),
        4 => json!({ "B": STANDARD.encode(u.arbitrary::<Vec<u8>>()?) }),
        5 => json!({ "SS": [json::string(u, STRINGS)?] }),
        6 => json!({ "L": [attribute(u, name, depth - 1)?] }),
        _ => json!({ "M": { "k": attribute(u, name, depth - 1)? } }),
    })
}

/// A `GetItem` answer body from the bytes: a well-formed item (`true`), or raw bytes.
fn get_item_body(data: &[u8]) -> Result<(Vec<u8>, bool)> {
    let mut u = Unstructured::new(data);
    if one_in(&mut u, 16)? {
        return Ok((u.take_rest().to_vec(), false));
    }
    // Half the items are well typed (most then decode), half are not.
    let noisy = u.arbitrary::<bool>()?;
    let mut item = Map::new();
    for name in NAMES {
        if one_in(&mut u, 8)? {
            continue;
        }
        let value = if noisy {
            attribute(&mut u, name, 1)?
        } else {
            valid_attribute(&mut u, name)?
        };
        item.insert((*name).to_owned(), value);
    }
    let body = if one_in(&mut u, 32)? {
        json!({})
    } else {
        json!({ "Item": item })
    };
    Ok((serde_json::to_vec(&body).unwrap_or_default(), true))
}

/// Target: a `GetItem` answer for a token record.
pub fn token_record(data: &[u8]) {
    decodes(data);
}

/// Runs [`token_record`] and tells whether the item decoded to a record (for the smoke's
/// coverage check).
pub fn decodes(data: &[u8]) -> bool {
    let Ok((body, well_formed)) = get_item_body(data) else {
        return false;
    };
    let original: Value = serde_json::from_slice(&body).unwrap_or_default();
    let harness = lock(harness());
    let record = match harness.read(body) {
        Ok(Some(record)) => record,
        Ok(None) => {
            assert!(
                original.get("Item").is_none() || !well_formed,
                "an item read as no record"
            );
            return false;
        }
        Err(StoreError::Corrupt { message, .. }) => {
            assert!(!message.is_empty());
            return false;
        }
        Err(e) => {
            // An item the table answered is data, not an outage: never `Unavailable` (which the
            // broker answers as 503 + Retry-After).
            assert!(!well_formed, "a well-formed item failed as {e:?}");
            return false;
        }
    };
    let item = original.get("Item").cloned().unwrap_or_default();
    let text = |name: &str| item[name]["S"].as_str();
    // What a record holds is what the item said, and valid.
    assert_eq!(Some(record.token_hash.as_str()), text(ta::TOKEN_HASH));
    assert!(TokenHash::parse(record.token_hash.as_str()).is_some());
    assert_eq!(Some(record.subject.namespace.as_str()), text(ta::NAMESPACE));
    assert_eq!(
        Some(record.subject.service_account.as_str()),
        text(ta::SERVICE_ACCOUNT)
    );
    assert_eq!(Some(record.role_arn.as_str()), text(ta::ROLE_ARN));
    assert!(RoleArn::parse(record.role_arn.as_str()).is_ok());
    // It re-encodes to an item with the same attributes where the item had the record's types…
    let written = harness.write(&record);
    for (name, value) in &written {
        let number = |v: &Value| v.get("N")?.as_str()?.parse::<i64>().ok();
        let Some(had) = item.get(name) else {
            // Only the numbers the decoder defaults (created_at, expires) appear from nowhere.
            assert_eq!(
                number(value),
                Some(0),
                "insert wrote {name}, which the item did not have"
            );
            continue;
        };
        match (had.get("S"), value.get("S")) {
            (Some(a), Some(b)) => assert_eq!(a, b, "{name}"),
            // A number is written as the item's, or as the default of one that was unreadable.
            _ => assert_eq!(
                number(value),
                Some(number(had).unwrap_or(0)),
                "{name}: {had} → {value}"
            ),
        }
    }
    // …which decodes to the same record.
    let again = serde_json::to_vec(&json!({ "Item": written })).unwrap_or_default();
    match harness.read(again) {
        Ok(Some(back)) => assert_eq!(back, record),
        other => panic!("a re-encoded record did not decode: {other:?}"),
    }
    true
}

/// Target: an Authorizations stream batch as the cleanup receives it.
pub fn stream_event(data: &[u8]) {
    let Ok(event) = serde_json::from_slice::<Event>(data) else {
        return;
    };
    let (removed, skipped) = removed_records(&event);
    assert_eq!(removed.len() + skipped, event.records.len());
    let removes = event
        .records
        .iter()
        .filter(|r| r.event_name == "REMOVE")
        .count();
    assert!(removed.len() <= removes);
    for r in &removed {
        assert!(!r.token_hash.is_empty() && !r.namespace.is_empty() && !r.secret_name.is_empty());
    }
}

/// An Authorizations stream batch built from the bytes, for seeds and the smoke.
pub fn arbitrary_stream_event(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    let mut records = Vec::new();
    for _ in 0..u.int_in_range(0..=3u8)? {
        let mut image = Map::new();
        for name in NAMES {
            if u.ratio(3u8, 4u8)? {
                image.insert((*name).to_owned(), attribute(u, name, 1)?);
            }
        }
        let name = *u.choose(&["REMOVE", "INSERT", "MODIFY", "remove", ""])?;
        records.push(json!({ "awsRegion": "us-east-1", "eventID": "1", "eventName": name,
            "eventSource": "aws:dynamodb", "eventVersion": "1.1",
            "eventSourceARN": "arn:aws:dynamodb:us-east-1:123456789012:table/Authorizations/stream/x",
            "dynamodb": { "Keys": {}, "OldImage": image, "SequenceNumber": "1",
                "SizeBytes": 1, "StreamViewType": "OLD_IMAGE" } }));
    }
    Ok(serde_json::to_vec(&json!({ "Records": records })).unwrap_or_default())
}
