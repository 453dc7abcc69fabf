from kaon.cli import main

raise SystemExit(main())
