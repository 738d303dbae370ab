fn main() {
    afl::fuzz!(|data: &[u8]| warmvm_fuzz::virtio_queues(data));
}
