use clap::Parser;
use refusal_lens::cli::Cli;

fn main() -> std::process::ExitCode {
    // candle asks for its thread count on every matmul, and without RAYON_NUM_THREADS that
    // means parsing /proc/cpuinfo each time (measured: 9 of 32 s when collecting 480
    // prompts). Pin it once, to candle's own default, before any thread starts.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Some(command) => refusal_lens::cli::run(
            command,
            refusal_lens::cli::ModelChoice {
                model: cli.model,
                adapter: cli.adapter,
                base: cli.base,
            },
        ),
        None => refusal_lens::gui::run(refusal_lens::cli::ModelChoice {
            model: cli.model,
            adapter: cli.adapter,
            base: cli.base,
        }),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes (a cause already quoted by its parent is
            // not repeated).
            let mut line = String::new();
            for cause in e.chain().map(|c| c.to_string()) {
                if !line.contains(&cause) {
                    if !line.is_empty() {
                        line.push_str(": ");
                    }
                    line.push_str(&cause);
                }
            }
            eprintln!("error: {}", line.replace('\n', " "));
            std::process::ExitCode::FAILURE
        }
    }
}
