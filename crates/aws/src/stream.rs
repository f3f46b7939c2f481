//! The Authorizations table's stream as the cleanup reads it: typed DynamoDB stream records
//! (`aws_lambda_events`), whose `REMOVE`s (TTL expiry, a revoke) become the token records they
//! removed. The attribute names are the table's ([`crate::dynamodb::token_attributes`]); the
//! core never sees the wire format.

use aws_lambda_events::event::dynamodb::Event;
use iam_broker_kernel::record::RemovedRecord;
use serde_dynamo::AttributeValue;

use crate::dynamodb::token_attributes as ta;

/// The removed token records of a stream batch, and how many records were not removals of a
/// whole token record (an `INSERT` / `MODIFY`, or a `REMOVE` whose old image lacks a name).
pub fn removed_records(event: &Event) -> (Vec<RemovedRecord>, usize) {
    let mut removed = Vec::new();
    let mut skipped = 0;
    for record in &event.records {
        let image = &record.change.old_image;
        let text = |name: &str| match image.get(name) {
            Some(AttributeValue::S(value)) if !value.is_empty() => Some(value.clone()),
            _ => None,
        };
        match (
            record.event_name.as_str(),
            text(ta::TOKEN_HASH),
            text(ta::NAMESPACE),
            text(ta::SECRET_NAME),
        ) {
            ("REMOVE", Some(token_hash), Some(namespace), Some(secret_name)) => {
                removed.push(RemovedRecord {
                    token_hash,
                    namespace,
                    secret_name,
                });
            }
            _ => skipped += 1,
        }
    }
    (removed, skipped)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    fn record(name: &str, old_image: serde_json::Value) -> serde_json::Value {
        json!({ "eventID": "1", "eventName": name, "eventVersion": "1.1",
            "eventSource": "aws:dynamodb", "awsRegion": "us-east-1",
            "dynamodb": { "ApproximateCreationDateTime": 1_795_000_000, "SizeBytes": 120,
                "Keys": { "token_hash": { "S": "h" } }, "OldImage": old_image,
                "StreamViewType": "OLD_IMAGE" } })
    }

    #[test]
    fn removes_are_read_from_the_old_image_and_the_rest_is_counted() {
        let image = json!({ "token_hash": { "S": "ab" }, "namespace": { "S": "team-a" },
            "service_account": { "S": "app" }, "secret_name": { "S": "iam-broker-token-ab" },
            "expires": { "N": "1795000000" } });
        let event: Event = serde_json::from_value(json!({ "Records": [
            record("REMOVE", image.clone()),
            record("INSERT", image),
            record("REMOVE", json!({ "token_hash": { "S": "cd" }, "namespace": { "N": "1" } })),
            record("REMOVE", json!(null)),
        ] }))
        .unwrap();
        let (removed, skipped) = removed_records(&event);
        assert_eq!(
            removed,
            vec![RemovedRecord {
                token_hash: "ab".into(),
                namespace: "team-a".into(),
                secret_name: "iam-broker-token-ab".into(),
            }]
        );
        assert_eq!(skipped, 3);
    }

    #[test]
    fn the_sample_event_decodes() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../events/dynamodb-stream-remove.json"
        ))
        .unwrap();
        let event: Event = serde_json::from_str(&text).unwrap();
        let (removed, skipped) = removed_records(&event);
        assert_eq!((removed.len(), skipped), (1, 0));
        assert_eq!(removed[0].namespace, "team-a");
    }
}
