"""The jobs' command lines: one module per job, each with `build_parser()`, `parse_config(argv)` and
`main(argv) -> exit status` (0, or 2 for a bad input or a refused run: `runtime.run_job`).

Installed as console scripts (pyproject.toml's [project.scripts]: `genre-label`, `genre-train`, ...); `jobs/<job>.py`
runs the same `main`, as the README, the Makefile, the Docker image and the k8s manifests call them.
"""
