from setup_kit.cli import main

main()
