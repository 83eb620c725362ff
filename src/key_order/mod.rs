//! Per-key order kept through retries (`[retry] keep_key_order`): while a record of a key is on
//! a retry tier, the key *waits* and its later records are held, durably, in the source
//! partition's key-order log; when the head ends they follow in order. The design — what is
//! written where, in which order, and what each crash point leaves — is in `docs/key-order.md`.
//!
//! Two parts, each in a file of its own because each is the whole of one promise:
//!
//! | file      | what                                                                    |
//! |-----------|-------------------------------------------------------------------------|
//! | [`state`] | the pure state of one partition: waiting keys, held records, caps, and what every record and log event leads to (ordering, never early, never lost) |
//! | [`wire`]  | the log's record format and its decoder of untrusted bytes                |
//! | [`log`]   | the log as a Kafka partition: append (acked) and read from the committed position |

pub(crate) mod log;
pub(crate) mod state;
pub(crate) mod wire;
