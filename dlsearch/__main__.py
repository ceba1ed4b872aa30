from dlsearch.cli.commands import main

main(prog_name="dlsearch")
