from vlp.study.cli import main

raise SystemExit(main())
