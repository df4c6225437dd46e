//! Arbitrary device bytes through the MQTT codec and the session state machine.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    gateway::ingest::fuzz::run(data);
});
