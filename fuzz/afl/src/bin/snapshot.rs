fn main() {
    afl::fuzz!(|data: &[u8]| warmvm_fuzz::snapshot(data));
}
