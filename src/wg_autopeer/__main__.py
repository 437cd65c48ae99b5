from wg_autopeer.cli import main

raise SystemExit(main())
