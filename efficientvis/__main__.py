from efficientvis.cli import main

raise SystemExit(main())
