from mfbatch.cli import main

main()
