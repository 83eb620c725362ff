//! The OpenAPI 3.0 document of the proxy's API, served at `GET /openapi.json`. Kept as a JSON
//! file beside the code (`openapi.json`). It is exact, not indicative: `.ci/run` runs
//! schemathesis against a live proxy with every check on (a request the document accepts must
//! not be refused for its shape, one it refuses must get a 4xx, and every answer must match
//! its response schema), and a unit test checks that it names every route and error code.

/// The document.
pub(crate) const DOCUMENT: &str = include_str!("openapi.json");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::status::ErrorKind;

    #[test]
    fn parses_and_names_every_route_and_code() {
        let doc: serde_json::Value = serde_json::from_str(DOCUMENT).unwrap();
        for (method, path) in crate::proxy::routes::ROUTES {
            let op = &doc["paths"][*path][method.as_str().to_ascii_lowercase()];
            assert!(op.is_object(), "{method} {path} missing");
        }
        let codes: Vec<u64> = doc["components"]["schemas"]["ErrorBody"]["properties"]["error_code"]
            ["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let mut expected: Vec<u64> = ErrorKind::ALL.iter().map(|k| u64::from(k.code())).collect();
        expected.sort_unstable();
        assert_eq!(codes, expected);
    }

    /// Every status a produce request can be answered with is declared on every produce
    /// operation (schemathesis' status-code conformance check, offline).
    #[test]
    fn every_produce_status_is_declared() {
        let doc: serde_json::Value = serde_json::from_str(DOCUMENT).unwrap();
        for path in [
            "/topics/{topic}",
            "/topics/{topic}/partitions/{partition}",
            "/v3/clusters/{cluster_id}/topics/{topic}/records",
        ] {
            let responses = &doc["paths"][path]["post"]["responses"];
            for kind in ErrorKind::ALL {
                let status = kind.status().as_u16();
                if status == 405 {
                    // Another method on the route: not an answer to this operation.
                    continue;
                }
                assert!(
                    responses[status.to_string()].is_object(),
                    "{path}: {status} ({kind:?}) is not declared"
                );
            }
        }
    }
}
