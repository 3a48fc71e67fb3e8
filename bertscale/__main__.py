from bertscale.cli import main

main()
