//! Arbitrary bytes into the frame decoder: it must never panic, and whatever it
//! accepts must encode back to a frame that decodes to the same message.
#![no_main]

use dirsync::wire::{decode_frame, encode_frame, Decoded};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = dirsync::wire::codec::decode_payload(data);
    if let Ok(Decoded::Frame(msg, used)) = decode_frame(data) {
        assert!(used <= data.len());
        let again = encode_frame(&msg).expect("a decoded message re-encodes");
        assert_eq!(decode_frame(&again), Ok(Decoded::Frame(msg, again.len())));
    }
});
