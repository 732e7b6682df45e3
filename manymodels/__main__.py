from manymodels.cli import main

main()
