from dlsearch.cli import main

main(prog_name="dlsearch")
