from passtd.options import main

raise SystemExit(main())
