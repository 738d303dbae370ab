fn main() {
    afl::fuzz!(|data: &[u8]| warmvm_fuzz::device_registers(data));
}
