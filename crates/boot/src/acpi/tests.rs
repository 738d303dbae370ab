//! The tables are checked twice: their own structure (checksums, lengths, the pointers from
//! the RSDP down), and by ACPICA's disassembler (`iasl -d`, Debian's acpica-tools), the
//! parser of the same project whose code Linux runs.

use super::*;

const BASE: u64 = RSDP_ADDR;

fn params(vcpus: u32) -> AcpiParams {
    AcpiParams { vcpus, i8042: true }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
}

/// The table at guest address `addr` of `blob`, by its header's length; checks its
/// signature and checksum.
fn table<'a>(blob: &'a [u8], addr: u64, signature: &[u8; 4]) -> &'a [u8] {
    let at = (addr - BASE) as usize;
    assert_eq!(&blob[at..at + 4], signature, "table at {addr:#x}");
    let len = u32_at(blob, at + 4) as usize;
    let t = &blob[at..at + len];
    if signature != b"FACS" {
        assert_eq!(sum(t), 0, "{} checksum", String::from_utf8_lossy(signature));
    }
    t
}

/// Every table, found from the RSDP as a kernel finds them: (signature, bytes).
fn walk(blob: &[u8]) -> Vec<([u8; 4], Vec<u8>)> {
    assert_eq!(&blob[..8], b"RSD PTR ");
    assert_eq!(sum(&blob[..20]), 0, "RSDP checksum");
    assert_eq!(sum(&blob[..36]), 0, "RSDP extended checksum");
    assert_eq!(blob[15], 2, "RSDP revision 2 (XSDT)");
    let xsdt = table(blob, u64_at(blob, 24), b"XSDT");
    let mut out = vec![(*b"XSDT", xsdt.to_vec())];
    for entry in xsdt[36..].chunks_exact(8) {
        let addr = u64::from_le_bytes(entry.try_into().unwrap());
        let sig: [u8; 4] = blob[(addr - BASE) as usize..][..4].try_into().unwrap();
        let t = table(blob, addr, &sig);
        if &sig == b"FACP" {
            let facs = u64_at(t, 132);
            assert_eq!(facs % 64, 0, "the FACS is 64-byte aligned");
            out.push((*b"FACS", table(blob, facs, b"FACS").to_vec()));
            out.push((*b"DSDT", table(blob, u64_at(t, 140), b"DSDT").to_vec()));
        }
        out.push((sig, t.to_vec()));
    }
    out
}

#[test]
fn every_table_is_reachable_from_the_rsdp_with_valid_checksums() {
    let blob = build(BASE, &params(4)).unwrap();
    let sigs: Vec<[u8; 4]> = walk(&blob).into_iter().map(|(s, _)| s).collect();
    assert_eq!(sigs, [*b"XSDT", *b"FACS", *b"DSDT", *b"FACP", *b"APIC"]);
    assert!(BASE + blob.len() as u64 <= ACPI_TABLES_END);
}

#[test]
fn vcpu_counts_the_tables_cannot_describe_are_refused() {
    assert!(matches!(
        build(BASE, &params(0)),
        Err(BootError::TooManyVcpus { .. })
    ));
    assert!(matches!(
        build(BASE, &params(MAX_CPUS + 1)),
        Err(BootError::TooManyVcpus { .. })
    ));
    // The most vCPUs still fit below the MP table.
    let blob = build(BASE, &params(MAX_CPUS)).unwrap();
    assert!(BASE + blob.len() as u64 <= ACPI_TABLES_END);
}

/// Disassemble each table with `iasl -d` and return the listings by signature.
fn disassemble(blob: &[u8]) -> std::collections::BTreeMap<String, String> {
    let dir = std::env::temp_dir().join(format!("warmvm-acpi-iasl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // (This ACPICA does not disassemble a lone RSDP: `walk` checks it.)
    let tables = walk(blob);
    let mut out = std::collections::BTreeMap::new();
    for (sig, bytes) in tables {
        let name = String::from_utf8_lossy(&sig)
            .to_lowercase()
            .replace(' ', "");
        let file = dir.join(format!("{name}.dat"));
        std::fs::write(&file, &bytes).unwrap();
        let run = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&file)
            .current_dir(&dir)
            .output()
            .expect("iasl runs: install acpica-tools (see the README's requirements)");
        let listing = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap_or_default();
        assert!(
            run.status.success() && !listing.is_empty(),
            "iasl -d {name}: {}\n{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
        out.insert(name, listing);
    }
    let _ = std::fs::remove_dir_all(&dir);
    out
}

/// The field of a data-table listing: `[084h 0132   1]   PM1 Event Block Length : 04`.
fn field<'a>(listing: &'a str, name: &str) -> &'a str {
    listing
        .lines()
        .find_map(|l| {
            let (label, value) = l.split_once(" : ")?;
            // Fields have an offset prefix in brackets; decoded flag bits do not.
            let label = label.rsplit_once(']').map_or(label, |(_, l)| l);
            (label.trim() == name).then(|| value.trim())
        })
        .unwrap_or_else(|| panic!("no {name:?} in\n{listing}"))
}

#[test]
fn acpica_disassembles_the_tables_into_what_was_put_in() {
    let vcpus = 3;
    let blob = build(BASE, &params(vcpus)).unwrap();
    let l = disassemble(&blob);
    for (name, listing) in &l {
        assert!(
            !listing.to_lowercase().contains("invalid")
                && !listing.contains("Incorrect")
                && !listing.contains("**** "),
            "{name}: ACPICA complains\n{listing}"
        );
    }

    let dsdt = &l["dsdt"];
    assert!(dsdt.contains("Name (_S5, Package (0x04)"), "{dsdt}");
    assert!(dsdt.contains("0x05"), "S5's sleep type 5: {dsdt}");

    let facp = &l["facp"];
    assert_eq!(field(facp, "SCI Interrupt"), "0009");
    assert_eq!(field(facp, "PM1A Event Block Address"), "00000600");
    assert_eq!(field(facp, "PM1 Event Block Length"), "04");
    assert_eq!(field(facp, "PM1A Control Block Address"), "00000604");
    assert_eq!(field(facp, "PM1 Control Block Length"), "02");
    assert_eq!(field(facp, "SMI Command Port"), "00000000");
    assert_eq!(
        field(facp, "Control Method Power Button (V1)"),
        "0",
        "fixed hardware"
    );
    assert_eq!(field(facp, "8042 Present on ports 60/64 (V2)"), "1");

    let apic = &l["apic"];
    let lapics = apic.matches("Processor Local APIC").count();
    assert_eq!(lapics, vcpus as usize, "one local APIC per vCPU\n{apic}");
    for id in 0..vcpus {
        assert!(
            apic.contains(&format!("Local Apic ID : {id:02X}")),
            "APIC ID {id}\n{apic}"
        );
    }
    assert_eq!(field(apic, "I/O Apic ID"), format!("{vcpus:02X}"));
    assert_eq!(field(apic, "Address"), "FEC00000");
    assert_eq!(
        apic.matches("[Interrupt Source Override]").count(),
        1,
        "{apic}"
    );
    let (_, iso) = apic.split_once("[Interrupt Source Override]").unwrap();
    assert_eq!(field(iso, "Source"), "09", "the SCI's override\n{apic}");
    assert_eq!(field(iso, "Interrupt"), "00000009");
    assert_eq!(field(iso, "Polarity"), "1", "active high");
    assert_eq!(field(iso, "Trigger Mode"), "3", "level");

    let xsdt = &l["xsdt"];
    assert_eq!(xsdt.matches("ACPI Table Address").count(), 2, "{xsdt}");
}
