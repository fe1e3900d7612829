//! The payloads the gateway sends match the JSON Schemas published in docs/schemas, and the
//! AsyncAPI document refers only to schemas that exist.

use std::path::Path;

fn schema(name: &str) -> jsonschema::Validator {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/schemas").join(name);
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    jsonschema::validator_for(&json).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap()
}

#[test]
fn status_payloads_match_their_schema() {
    let status = schema("status.json");
    for payload in [lockhub::cloud::link::online_payload(), lockhub::cloud::link::offline_payload()] {
        let value = json(&payload);
        assert!(status.is_valid(&value), "{value} does not match status.json");
    }
    for bad in [r#"{"status":"online"}"#, r#"{"status":"maybe"}"#, r#"{"status":"offline","ip":"10.0.0.1"}"#] {
        assert!(!status.is_valid(&json(bad.as_bytes())), "{bad} should not match");
    }
}

#[test]
fn the_asyncapi_document_refers_to_existing_schemas() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    let asyncapi = std::fs::read_to_string(docs.join("asyncapi.yaml")).unwrap();
    let refs: Vec<&str> =
        asyncapi.lines().filter_map(|l| l.trim().strip_prefix("$ref: './")).map(|r| r.trim_end_matches('\'')).collect();
    assert!(!refs.is_empty());
    for r in refs {
        assert!(docs.join(r).exists(), "asyncapi.yaml refers to missing {r}");
        schema(r.trim_start_matches("schemas/"));
    }
}
