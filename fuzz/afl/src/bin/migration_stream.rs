fn main() {
    afl::fuzz!(|data: &[u8]| warmvm_fuzz::migration_stream(data));
}
