//! `--config FILE` against a small command like `tandem serve`'s.

use super::*;
use clap::{Args, Parser, Subcommand};
use std::io::Write;

#[derive(Parser)]
struct Top {
    #[command(subcommand)]
    cmd: Cmd,
}
#[derive(Subcommand)]
enum Cmd {
    Serve(TestArgs),
}
#[derive(Args)]
struct TestArgs {
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    print_config: bool,
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: std::net::SocketAddr,
    #[arg(long, default_value_t = 64)]
    max_branches: usize,
    #[arg(long, default_value = "100ms")]
    retry_initial: String,
    #[arg(long)]
    require_tls: bool,
    #[arg(long, value_delimiter = ',')]
    allow_participant: Vec<String>,
    #[arg(long)]
    store: Option<String>,
    #[arg(long)]
    api_token: Option<String>,
}

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(text.as_bytes()).expect("write");
    f
}

fn parse(text: &str, extra: &[&str]) -> Result<Layered, ConfigFileError> {
    use clap::CommandFactory;
    let f = file(text);
    let mut argv: Vec<OsString> = vec!["t".into(), "serve".into(), "--config".into()];
    argv.push(f.path().into());
    argv.extend(extra.iter().map(OsString::from));
    parse_layered(Top::command(), argv, "serve")
}

fn serve(l: &Layered) -> &ArgMatches {
    l.matches.subcommand_matches("serve").expect("serve")
}

// Keys in either spelling and tables joined with `-` set their flags.
#[test]
fn file_values_fill_flags() {
    let l = parse(
        "listen = \"127.0.0.1:9\"\nmax_branches = 7\nrequire-tls = true\n\
         allow-participant = [\"a\", \"b\"]\n[retry]\ninitial = \"5s\"\n",
        &[],
    )
    .expect("parses");
    let m = serve(&l);
    assert_eq!(
        m.get_one::<std::net::SocketAddr>("listen")
            .map(|a| a.port()),
        Some(9)
    );
    assert_eq!(m.get_one::<usize>("max_branches"), Some(&7));
    assert!(m.get_flag("require_tls"));
    assert_eq!(
        m.get_many::<String>("allow_participant")
            .map(|v| v.cloned().collect::<Vec<_>>()),
        Some(vec!["a".to_string(), "b".to_string()])
    );
    assert_eq!(
        m.get_one::<String>("retry_initial").map(String::as_str),
        Some("5s")
    );
    let shown = l.render();
    assert!(shown.contains("max-branches = 7  # file"), "{shown}");
    assert!(shown.contains("# store =  # unset"), "{shown}");
}

// The command line wins over the file.
#[test]
fn command_line_wins() {
    let l = parse("max-branches = 7\n", &["--max-branches", "9"]).expect("parses");
    assert_eq!(serve(&l).get_one::<usize>("max_branches"), Some(&9));
    assert!(l.render().contains("max-branches = 9  # flag"));
}

// An unknown key is refused, named with its line and the nearest flag.
#[test]
fn unknown_key_is_named() {
    let e = parse("listen = \"127.0.0.1:1\"\n\nmax-branchs = 3\n", &[])
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("unknown key \"max-branchs\""), "{e}");
    assert!(e.contains("(line 3)"), "{e}");
    assert!(e.contains("did you mean \"max-branches\""), "{e}");
    let e = parse("config = \"x\"\n", &[]).err().expect("refused");
    assert!(e.to_string().contains("unknown key \"config\""), "{e}");
}

// A value the flag's parser refuses names the key.
#[test]
fn bad_value_names_the_key() {
    let e = parse("\nlisten = \"nowhere\"\n", &[])
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("key \"listen\" (line 2)"), "{e}");
    let e = parse("require-tls = \"yes\"\n", &[])
        .err()
        .expect("refused");
    assert!(e.to_string().contains("\"require-tls\""), "{e}");
    let e = parse("max-branches = [1, 2]\n", &[])
        .err()
        .expect("refused");
    assert!(e.to_string().contains("\"max-branches\""), "{e}");
    let e = parse("listen = \n", &[]).err().expect("refused");
    assert!(!e.to_string().is_empty());
}

#[test]
fn secrets_are_redacted() {
    let l = parse(
        "store = \"postgres://tandem:hunter2@db/tandem?password=x&sslmode=require\"\n\
         api-token = \"abc\"\n",
        &[],
    )
    .expect("parses");
    let shown = l.render();
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(!shown.contains("\"abc\""), "{shown}");
    assert!(shown.contains("postgres://tandem:***@db/tandem?password=***&sslmode=require"));
    // The file's values are secrets to scrub from any output too.
    assert_eq!(l.secrets().scrub("hunter2 / abc"), "*** / ***");
}
