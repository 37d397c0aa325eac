from polyak.service.cli import main

main()
