from llmx.cli.main import main

main()
