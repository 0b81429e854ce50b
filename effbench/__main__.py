from effbench.workers import main

main()
