//! Checks policy files: `cargo run -p vmotion-policy --example check -- DIR VM...`
//! prints each VM's resolved policy or the error naming file, line and key.

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next() else {
        eprintln!("usage: check DIR VM...");
        std::process::exit(2);
    };
    let mut failed = false;
    for vm in args {
        match vmotion_policy::load(std::path::Path::new(&dir), &vm) {
            Ok(p) => println!("{vm}: {p:#?}"),
            Err(e) => {
                failed = true;
                println!("{e}");
            }
        }
    }
    std::process::exit(i32::from(failed));
}
