//! Config loading on arbitrary text: parsed or refused with a reason, never a panic; a
//! configuration that validates resolves its retry policy without overflow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sidetrack::Config;

fuzz_target!(|text: &str| {
    if let Ok(config) = Config::from_toml_str(text) {
        if config.validate().is_ok() {
            let policy = config.retry.policy().expect("validated");
            for tier in 0..policy.tiers().len() {
                let _ = policy.max_due_delay(tier);
            }
        }
    }
});
