from tfmir.cli.main import run

run()
