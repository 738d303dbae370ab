//! Tables for people, one JSON document for scripts.

pub fn print_json<T: serde::Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("warmvm: error: cannot encode results as JSON: {e}"),
    }
}

/// A plain table whose columns are as wide as their widest cell (VM names of any length
/// stay aligned): no borders, two spaces between columns, columns in `right` right-aligned.
pub fn table(header: &[&str], rows: Vec<Vec<String>>, right: &[usize]) -> String {
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header(header.to_vec());
    for row in rows {
        t.add_row(row);
    }
    for i in 0..header.len() {
        if let Some(c) = t.column_mut(i) {
            c.set_padding((0, 2));
            if right.contains(&i) {
                c.set_cell_alignment(comfy_table::CellAlignment::Right);
            }
        }
    }
    t.lines()
        .map(|l| l.trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}
