from kvprof.cli.main import main

raise SystemExit(main())
