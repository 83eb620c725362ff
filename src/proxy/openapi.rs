//! The OpenAPI 3.0 document of the proxy's API, served at `GET /openapi.json`. Kept as text
//! beside the code; a unit test checks that it parses and names every route and error code.

/// The document.
pub const DOCUMENT: &str = r##"{
  "openapi": "3.0.3",
  "info": {
    "title": "sidetrack HTTP produce proxy",
    "version": "1",
    "description": "Produce to Kafka over HTTP, Confluent REST v2 compatible. A request returns when every record is acknowledged by all in-sync replicas (200) or has failed (the status of the worst failure; see the README's status table). Per-record results are in `offsets`, in request order."
  },
  "paths": {
    "/topics/{topic}": {
      "post": {
        "summary": "Produce records (v2)",
        "parameters": [
          {"name": "topic", "in": "path", "required": true, "schema": {"type": "string"}},
          {"name": "Idempotency-Key", "in": "header", "required": false, "schema": {"type": "string", "maxLength": 255}, "description": "A retry with the same key and request within the window gets the first answer (per instance)."}
        ],
        "requestBody": {"$ref": "#/components/requestBodies/V2Produce"},
        "responses": {"200": {"description": "Every record acknowledged (acks=all)", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/V2Response"}}}}, "default": {"description": "Not every record was acknowledged (the status of the worst failure; `offsets` says which were), or the request was refused as a whole (ErrorBody)", "content": {"application/json": {"schema": {"oneOf": [{"$ref": "#/components/schemas/V2Response"}, {"$ref": "#/components/schemas/ErrorBody"}]}}}}}
      }
    },
    "/topics/{topic}/partitions/{partition}": {
      "post": {
        "summary": "Produce records to one partition (v2)",
        "parameters": [
          {"name": "topic", "in": "path", "required": true, "schema": {"type": "string"}},
          {"name": "partition", "in": "path", "required": true, "schema": {"type": "integer", "minimum": 0, "maximum": 2147483647}},
          {"name": "Idempotency-Key", "in": "header", "required": false, "schema": {"type": "string", "maxLength": 255}}
        ],
        "requestBody": {"$ref": "#/components/requestBodies/V2Produce"},
        "responses": {"200": {"description": "Every record acknowledged (acks=all)", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/V2Response"}}}}, "default": {"description": "Not every record was acknowledged (the status of the worst failure; `offsets` says which were), or the request was refused as a whole (ErrorBody)", "content": {"application/json": {"schema": {"oneOf": [{"$ref": "#/components/schemas/V2Response"}, {"$ref": "#/components/schemas/ErrorBody"}]}}}}}
      }
    },
    "/v3/clusters": {
      "get": {"summary": "The cluster this proxy serves", "responses": {"200": {"description": "KafkaClusterList"}}}
    },
    "/v3/clusters/{cluster_id}": {
      "get": {
        "summary": "One cluster",
        "parameters": [{"name": "cluster_id", "in": "path", "required": true, "schema": {"type": "string"}}],
        "responses": {"200": {"description": "KafkaCluster"}, "404": {"$ref": "#/components/responses/Error"}}
      }
    },
    "/v3/clusters/{cluster_id}/topics/{topic}/records": {
      "post": {
        "summary": "Produce one record (v3 shape, real status codes)",
        "parameters": [
          {"name": "cluster_id", "in": "path", "required": true, "schema": {"type": "string"}},
          {"name": "topic", "in": "path", "required": true, "schema": {"type": "string"}},
          {"name": "Idempotency-Key", "in": "header", "required": false, "schema": {"type": "string", "maxLength": 255}}
        ],
        "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/V3Record"}}}},
        "responses": {
          "200": {"description": "Acknowledged", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/V3Result"}}}},
          "default": {"$ref": "#/components/responses/Error"}
        }
      }
    },
    "/healthz": {"get": {"summary": "The process is alive", "responses": {"200": {"description": "ok"}}}},
    "/readyz": {"get": {"summary": "Broker metadata is reachable and the instance is not shutting down", "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}}}},
    "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text exposition format"}}}},
    "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.0"}}}}
  },
  "components": {
    "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    "requestBodies": {
      "V2Produce": {
        "required": true,
        "content": {
          "application/vnd.kafka.json.v2+json": {"schema": {"$ref": "#/components/schemas/V2Body"}},
          "application/json": {"schema": {"$ref": "#/components/schemas/V2Body"}},
          "application/vnd.kafka.binary.v2+json": {"schema": {"$ref": "#/components/schemas/V2Body"}}
        }
      }
    },
    "responses": {
      "Error": {"description": "Refused or failed", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
    },
    "schemas": {
      "V2Body": {
        "type": "object",
        "required": ["records"],
        "properties": {
          "records": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/V2Record"}}
        }
      },
      "V2Record": {
        "type": "object",
        "additionalProperties": false,
        "properties": {
          "key": {"description": "JSON formats: any JSON, written as its JSON text; binary: a base64 string; null or absent: no key"},
          "value": {"description": "as key; null or absent: a null value (tombstone)"},
          "partition": {"type": "integer", "minimum": 0, "maximum": 2147483647},
          "headers": {"type": "array", "items": {"$ref": "#/components/schemas/V2Header"}}
        }
      },
      "V2Header": {
        "type": "object",
        "required": ["key"],
        "properties": {"key": {"type": "string"}, "value": {"type": "string", "format": "byte", "nullable": true}}
      },
      "V2Response": {
        "type": "object",
        "properties": {
          "key_schema_id": {"type": "integer", "nullable": true},
          "value_schema_id": {"type": "integer", "nullable": true},
          "offsets": {"type": "array", "items": {"$ref": "#/components/schemas/Offset"}},
          "error_code": {"type": "integer", "description": "only when not every record was acknowledged"},
          "message": {"type": "string"}
        }
      },
      "Offset": {
        "type": "object",
        "properties": {
          "partition": {"type": "integer", "nullable": true},
          "offset": {"type": "integer", "nullable": true, "description": "null when failed, or acknowledged without an offset (librdkafka's implicit ack; error_code null then)"},
          "error_code": {"type": "integer", "nullable": true},
          "error": {"type": "string", "nullable": true}
        }
      },
      "V3Record": {
        "type": "object",
        "properties": {
          "partition_id": {"type": "integer", "minimum": 0},
          "headers": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}, "value": {"type": "string", "format": "byte", "nullable": true}}}},
          "key": {"$ref": "#/components/schemas/V3Data"},
          "value": {"$ref": "#/components/schemas/V3Data"},
          "timestamp": {"type": "string", "format": "date-time"}
        }
      },
      "V3Data": {
        "type": "object",
        "properties": {"type": {"type": "string", "enum": ["BINARY", "JSON", "STRING"], "default": "JSON"}, "data": {}}
      },
      "V3Result": {
        "type": "object",
        "properties": {
          "error_code": {"type": "integer"}, "cluster_id": {"type": "string"}, "topic_name": {"type": "string"},
          "partition_id": {"type": "integer"}, "offset": {"type": "integer", "nullable": true},
          "timestamp": {"type": "string", "nullable": true}, "key": {"type": "object", "nullable": true}, "value": {"type": "object", "nullable": true}
        }
      },
      "ErrorBody": {
        "type": "object",
        "required": ["error_code", "message"],
        "properties": {
          "error_code": {"type": "integer", "enum": [40001, 40101, 40301, 40302, 40303, 40401, 40402, 40403, 40404, 40501, 40801, 40901, 41301, 41302, 41303, 41304, 41501, 41502, 42201, 42202, 42203, 42204, 42205, 42206, 42207, 42208, 42901, 50001, 50002, 50301, 50302]},
          "message": {"type": "string"}
        }
      }
    }
  },
  "security": [{"bearer": []}, {}]
}"##;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::status::ErrorKind;

    #[test]
    fn parses_and_names_every_route_and_code() {
        let doc: serde_json::Value = serde_json::from_str(DOCUMENT).unwrap();
        for (method, path) in crate::proxy::server::ROUTES {
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
}
